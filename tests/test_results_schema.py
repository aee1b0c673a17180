"""results.json through its types (`lorasum.results_schema`, `lorasum.records`): a file reads
back whole and writes again byte for byte, today's unversioned files (version 1) migrate to a
report identical to the one the code before the schema rendered, a newer version is refused in
one line, and a study writes what the types declare (`assert_reads_back_whole`, called by the
study tests)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorasum.analysis import forecast
from lorasum.cli import main
from lorasum.data import combo_name
from lorasum.errors import LorasumError
from lorasum.io import dumps_strict
from lorasum.records import Record, RecordError, optional
from lorasum.report.build import render_markdown
from lorasum.results_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Results,
    as_results,
    load_results,
    upgrade,
)

FIXTURES = Path(__file__).parent / "fixtures"
# runs/converged/trained/results.json of lorasum 0.1.0 (no schema_version: version 1), trimmed;
# the report.md beside it was rendered from it by the code before the schema (commit d13b5ac)
V1 = FIXTURES / "results_v1.json"
V1_REPORT = FIXTURES / "results_v1_report.md"


def undeclared(obj, where: str = "results") -> list[str]:
    """Every key some record of ``obj`` does not declare (kept in its ``extra``)."""
    if isinstance(obj, Record):
        out = [f"{where}.{k}" for k in obj.extra]
        return out + [x for k, v in vars(obj).items() for x in undeclared(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in undeclared(v, f"{where}[{i}]")]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in undeclared(v, f"{where}.{k}")]
    return []


def assert_names_match_lists(results: Results) -> None:
    """Every record naming a combination by its joined name has that combination's list."""
    combos = {tuple(r.domains) for r in results.combinations}
    named = [
        *((results.training_budget.combinations or []) if results.training_budget else []),
        *((results.snapshots.combinations or []) if results.snapshots else []),
        *((results.accuracy.best_method or []) if results.accuracy else []),
    ]
    for record in named:
        assert combo_name(record.domains) == record.combination
        assert tuple(record.domains) in combos


def assert_reads_back_whole(out: Path, returned: dict) -> None:
    """A study's results.json: the current version first, every key declared by the types,
    written again byte for byte, equal to what `reproduce` returned."""
    text = (out / "results.json").read_text()
    parsed = json.loads(text)
    assert list(parsed)[0] == "schema_version" and parsed["schema_version"] == SCHEMA_VERSION
    results = load_results(out / "results.json")
    assert undeclared(results) == []
    assert results.to_json() == text
    assert json.loads(json.dumps(returned)) == parsed
    assert_names_match_lists(results)


# --- records ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Point(Record):
    name: str
    x: float | None = None
    tags: list[str] | None = optional()


@dataclass(kw_only=True)
class Shape(Record):
    points: list[Point]
    by_name: dict[str, Point] | None = None
    note: dict | None = None  # free-form


def test_records_read_and_write_field_by_field():
    obj = {
        "note": {"any": [1, {"thing": None}]},
        "points": [{"x": 1.5, "name": "a", "colour": "red"}, {"name": "b", "tags": ["t"]}],
        "by_name": {"c": {"name": "c", "x": None}},
    }
    shape = Shape.from_dict(copy.deepcopy(obj))
    assert shape.points[0] == Point(name="a", x=1.5, extra={"colour": "red"})
    assert shape.by_name["c"] == Point(name="c")
    assert shape.note == obj["note"]
    out = shape.to_dict()
    # declared fields in declaration order, then the undeclared keys; an optional field only
    # when set, any other field always (null when None)
    assert list(out) == ["points", "by_name", "note"]
    assert out["points"] == [
        {"name": "a", "x": 1.5, "colour": "red"},
        {"name": "b", "x": None, "tags": ["t"]},
    ]
    assert list(out["points"][0]) == ["name", "x", "colour"]
    assert out["by_name"] == {"c": {"name": "c", "x": None}}
    assert Shape.from_dict(json.loads(json.dumps(out))) == shape
    out["note"]["any"].append(2)  # the written object is a copy
    assert shape.note == obj["note"]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"points": [{"name": "a"}, {"x": 1.0}]}, "points[1] lacks name"),
        ({"points": {"name": "a"}}, "points is an object, not a list"),
        ({"points": [], "by_name": {"k": [1]}}, "by_name.k is a list, not an object"),
        ({"by_name": {}}, "Shape lacks points"),
        ([1], "Shape is a list, not an object"),
    ],
)
def test_records_say_where_a_shape_is_wrong(obj, message):
    with pytest.raises(RecordError) as e:
        Shape.from_dict(obj)
    assert str(e.value) == message


# --- the file -------------------------------------------------------------------------------


def test_a_results_file_round_trips(tmp_path):
    from test_report import full_results  # a synthetic study: triples, snapshots, cross-domain

    for i, results in enumerate([load_results(V1), as_results(full_results())]):
        path = tmp_path / f"{i}.json"
        path.write_text(results.to_json())
        again = load_results(path)
        assert again == results
        assert again.to_json() == path.read_text()
        assert again.schema_version == SCHEMA_VERSION


def test_todays_file_reads_whole_and_keeps_its_layout():
    text = V1.read_text()
    results = load_results(V1)
    assert undeclared(results) == []  # every key of today's file has its field
    migrated = upgrade(json.loads(text))
    assert json.dumps(results.to_dict()) == json.dumps(migrated)  # same keys, same order
    # the visible changes: the version first, and domain lists beside joined names
    written = results.to_dict()
    assert list(written)[:2] == ["schema_version", "lorasum_version"]
    del written["schema_version"]
    for record in written["training_budget"]["combinations"] + written["accuracy"]["best_method"]:
        assert list(record)[:2] == ["combination", "domains"]
        del record["domains"]
    assert dumps_strict(written) + "\n" == text


def test_todays_file_migrates_to_the_report_todays_code_renders():
    golden = V1_REPORT.read_text()
    assert render_markdown(load_results(V1)) == golden
    assert render_markdown(json.loads(V1.read_text())) == golden  # a parsed dict, migrated


def test_migration_adds_domain_lists_and_leaves_its_input_alone():
    raw = json.loads(V1.read_text())
    before = copy.deepcopy(raw)
    migrated = upgrade(raw)
    assert raw == before
    assert "schema_version" not in raw and migrated["schema_version"] == SCHEMA_VERSION
    assert_names_match_lists(Results.from_dict(migrated))
    assert [c["domains"] for c in migrated["training_budget"]["combinations"]] == [
        r["domains"] for r in raw["combinations"]
    ]
    # a name the file has no combination for: its parts (domain names hold no '+')
    raw["training_budget"]["combinations"][0]["combination"] = "finance+math"
    assert upgrade(raw)["training_budget"]["combinations"][0]["domains"] == ["finance", "math"]
    assert upgrade(migrated) == migrated  # the current version: nothing to migrate


def test_every_older_version_has_a_migration():
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (
            SCHEMA_VERSION + 1,
            f"has results schema version {SCHEMA_VERSION + 1}; this lorasum "
            f"reads versions up to {SCHEMA_VERSION}: read it with the lorasum "
            "that wrote it",
        ),
        ("2", "has schema_version '2', not a version number"),
        (0, "has schema_version 0, not a version number"),
    ],
)
def test_a_version_it_cannot_read_is_one_line_exit_2_nothing_written(
    tmp_path, capsys, version, message
):
    study = tmp_path / "study"
    study.mkdir()
    newer = {"schema_version": version, **json.loads(V1.read_text())}
    (study / "results.json").write_text(json.dumps(newer))
    before = _tree(tmp_path)
    assert main(["report", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorasum: error: {study / 'results.json'} {message}")
    assert err.count("\n") == 1
    assert _tree(tmp_path) == before
    with pytest.raises(LorasumError, match="schema_version|schema version"):
        forecast.read_studies([study])  # `lorasum predict --fit` reads through the schema too


def test_a_file_of_the_wrong_shape_is_one_line(tmp_path, capsys):
    bad = json.loads(V1.read_text())
    bad["combinations"][1] = [1, 2]
    (tmp_path / "results.json").write_text(json.dumps(bad))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a lorasum study's results (combinations[1] is a list, not an object)" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "report.md").exists()

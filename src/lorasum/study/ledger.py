"""The study's ledger: what each finished unit wrote, so that a damaged output is not reused.

``DIR/units.json`` maps a unit id to its output (relative to the study directory) and the size
and sha256 of every file in it: ``{"train/42/math": {"output": "seed-42/adapters/math",
"files": {"adapter_model.safetensors": [size, sha256], ...}}}`` (a file output's one entry is
``"."``). Only the driver writes it, atomically, after a unit finishes. Before a cached unit is
reused, `Ledger.verify` compares its output with its entry; a unit without one (an older study,
or a run killed between finishing a unit and recording it) gets a structural check (JSON
parses, a .safetensors header matches its file's size). Units without an output (calibration:
its cache lives in $LORASUM_HOME) are not verified.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from lorasum.io import MARKER, read_json, sha256_file, write_json
from lorasum.study.tasks import Task

LEDGER_NAME = "units.json"
SELF = "."  # the key of a file output's own digest


# --- digests and checks: small pure functions over paths ----------------------------------------


def _files(output: Path) -> list[tuple[str, Path]]:
    """(name relative to ``output``, path) of every file of an output; temps (dot names) left
    out. A file output is its one file, named ``.``."""
    if output.is_file():
        return [(SELF, output)]
    return sorted(
        (p.relative_to(output).as_posix(), p)
        for p in output.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(output).parts)
    )


def file_digest(path: Path) -> list:
    """[size in bytes, sha256] of one file."""
    return [path.stat().st_size, sha256_file(path)]


def output_digests(output: Path) -> dict[str, list]:
    """Every file of an output → [size, sha256]."""
    return {name: file_digest(path) for name, path in _files(output)}


def _size_first_problem(recorded: dict[str, list], output: Path) -> str | None:
    """Missing files and size changes, found without reading a byte."""
    for name, (size, _) in recorded.items():
        path = output if name == SELF else output / name
        if not path.is_file():
            return "is missing" if name == SELF else f"{name} is missing"
        found = path.stat().st_size
        if found != size:
            what = "" if name == SELF else f"{name} "
            return f"{what}changed on disk (size {found:,} ≠ {size:,} recorded)"
    return None


def digest_problem(recorded: dict[str, list], output: Path) -> str | None:
    """What differs between an output and its recorded digests (None: nothing). Files the
    output holds beyond the recorded ones are not its damage (and not looked at)."""
    if not output.exists():
        return "is missing"
    problem = _size_first_problem(recorded, output)
    if problem is not None:
        return problem
    for name, (_, sha) in recorded.items():
        if sha256_file(output if name == SELF else output / name) != sha:
            what = "" if name == SELF else f"{name} "
            return f"{what}changed on disk (same size, another sha256)"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A .safetensors file that safetensors cannot open (a cut-short file: its header's data
    offsets do not cover the file exactly); None when it opens."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        return f"cannot be read ({str(e).strip()[:80]})"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    json.loads(line)
        else:
            json.loads(path.read_text())
    except (OSError, ValueError):
        return "is not valid JSON"
    return None


def structural_problem(output: Path) -> str | None:
    """A cheap check of an unrecorded output: JSON files parse, .safetensors headers match
    their files' sizes, a directory has its marker (None: it looks whole)."""
    if not output.exists():
        return "is missing"
    if output.is_dir() and not (output / MARKER).is_file():
        return f"has no {MARKER}"
    for name, path in _files(output):
        what = "" if name == SELF else f"{name} "
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".json", ".jsonl"):
            problem = _json_problem(path)
        else:
            continue
        if problem is not None:
            return what + problem
    return None


def _line(rel: str, problem: str) -> str:
    """'seed-1/evals/x.json is missing', 'seed-1/adapters/a: adapter_model.safetensors …'."""
    return f"{rel} {problem}" if problem.startswith(("is ", "has ")) else f"{rel}: {problem}"


def remove_output(output: Path) -> None:
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    elif output.exists() or output.is_symlink():
        output.unlink()


# --- the ledger ------------------------------------------------------------------------------


class Ledger:
    """The digests of a study's finished units (``root/units.json``); `execute` asks it
    before reusing a cached unit."""

    def __init__(self, root: Path, entries: dict[str, dict]):
        self.root, self.entries = Path(root), entries

    @classmethod
    def load(cls, root: str | Path) -> Ledger:
        """The study's ledger (empty when there is none yet, or it is unreadable: every cached
        unit then gets the structural check and is recorded again)."""
        try:
            entries = read_json(Path(root) / LEDGER_NAME)
        except (OSError, ValueError):
            entries = {}
        return cls(root, entries if isinstance(entries, dict) else {})

    def _relative(self, unit: Task) -> str | None:
        """The unit's output relative to the study (None: not verified)."""
        output = unit.output()
        if output is None:
            return None
        try:
            return Path(output).relative_to(self.root).as_posix()
        except ValueError:
            return None  # outside the study: not the study's to verify or remove

    def status(self, unit: Task) -> tuple[str, str | None]:
        """(state, problem): ``ok`` / ``damaged`` / ``missing`` (recorded, checked against its
        digests), ``unrecorded`` (present, whole to the structural check; damaged if not),
        ``not run`` (no entry, no output), ``unverified`` (no output of its own)."""
        rel = self._relative(unit)
        if rel is None:
            return "unverified", None
        output = self.root / rel
        entry = self.entries.get(unit.id)
        if entry is not None and entry.get("output") == rel:
            problem = digest_problem(entry.get("files", {}), output)
            if problem is None:
                return "ok", None
            return ("missing" if problem == "is missing" else "damaged"), _line(rel, problem)
        if not output.exists():
            return "not run", None
        problem = structural_problem(output)
        return ("unrecorded", None) if problem is None else ("damaged", _line(rel, problem))

    def verify(self, unit: Task) -> str | None:
        """Before reusing ``unit``: its output's problem in one line, or None (fine). A whole
        unrecorded output is recorded now."""
        state, problem = self.status(unit)
        if state == "unrecorded":
            self.record(unit)
        return problem

    def record(self, unit: Task) -> None:
        """Record a finished unit's output digests (atomically rewrites the ledger)."""
        rel = self._relative(unit)
        if rel is None or not (self.root / rel).exists():
            return
        self.entries[unit.id] = {"output": rel, "files": output_digests(self.root / rel)}
        self._save()

    def invalidate(self, unit: Task) -> None:
        """Forget ``unit`` and remove its output, so that it runs again from nothing."""
        rel = self._relative(unit)
        if self.entries.pop(unit.id, None) is not None:
            self._save()
        if rel is not None:
            remove_output(self.root / rel)

    def _save(self) -> None:
        write_json(self.root / LEDGER_NAME, self.entries)


VERIFY_STATES = ("ok", "damaged", "missing", "not run", "unrecorded")


def verify_units(ledger: Ledger, units: Sequence[Task]) -> dict:
    """`reproduce --verify`: every unit's output against the ledger, nothing run or written.
    Per kind the count of each state (`Ledger.status`), one line per damaged or missing unit,
    the table as ``text``, and ``ok`` (nothing damaged or missing). Units without an output of
    their own (calibration: its cache lives in $LORASUM_HOME) are not verified."""
    counts: dict[str, dict[str, int]] = {}
    problems, unverified = [], 0
    for u in units:
        state, problem = ledger.status(u)
        if state == "unverified":
            unverified += 1
            continue
        counts.setdefault(u.kind, dict.fromkeys(VERIFY_STATES, 0))[state] += 1
        if problem is not None:
            problems.append(f"{u.id}: {problem}")
    lines = [f"{'unit kind':<12}" + "".join(f"{s:>12}" for s in VERIFY_STATES)]
    lines += [f"{k:<12}" + "".join(f"{c[s]:>12}" for s in VERIFY_STATES) for k, c in counts.items()]
    if unverified:
        lines.append(
            f"not verified: {unverified} unit(s) without an output in the study (calibration)"
        )
    lines += problems
    return {"ok": not problems, "counts": counts, "problems": problems, "text": "\n".join(lines)}

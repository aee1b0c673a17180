"""`hf:<id>[:split]` sources go through `datasets.load_dataset` (a local folder stands in for a hub id)."""

import pytest
from conftest import make_qa, write_jsonl

from lorasum.data import load_source
from lorasum.errors import LorasumError


def test_hf_source_loads_through_datasets(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [
        {"Problem": r["question"], "Rationale": r["answer"], "extra": 1}
        for r in make_qa("arith", 12)
    ]
    write_jsonl(folder / "train.jsonl", rows)
    qa, origin = load_source(f"hf:{folder}:train")  # math_qa-style field names are detected
    assert (
        len(qa) == 12
        and qa[0].question == rows[0]["Problem"]
        and qa[0].answer == rows[0]["Rationale"]
    )
    assert origin.startswith(f"hf:{folder}:train")


def test_unreachable_hf_dataset_is_one_clear_error():
    with pytest.raises(LorasumError, match="hub must be reachable"):
        load_source("hf:nobody/no-such-dataset-xyz")

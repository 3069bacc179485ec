"""The JSON records that data preparation writes and the model stages read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from .prompt import ANSWERS

LABELLED_FIELDS = ("instruction", "input", "output")
TEST_FIELDS = ("id", "instruction", "input")
# Every record also has "options": the four option texts its input ends with
# (so scoring can show them in another order).

Kind = Literal["labelled", "test"]


class RecordError(ValueError):
    """A JSON record file that does not follow the record schema."""


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON through a temporary file so a failed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def read_records(path: str | os.PathLike, kind: Kind) -> list[dict]:
    """Read and check a record file; labelled records also get an int `label` (1-4)."""
    fields = LABELLED_FIELDS if kind == "labelled" else TEST_FIELDS
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    if not isinstance(records, list):
        raise RecordError(f"{path}: expected a JSON list of records")
    for n, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record.get(f), str)]
        options = record.get("options")
        if not (isinstance(options, list) and len(options) == len(ANSWERS) and all(isinstance(o, str) for o in options)):
            missing.append("options (a list of four strings)")
        if missing:
            raise RecordError(f"{path}: record {n} lacks field(s) {missing}; rerun data preparation")
        if kind == "labelled":
            if record["output"] not in ANSWERS:
                raise RecordError(f"{path}: record {n} has output {record['output']!r}, expected one of {ANSWERS}")
            record["label"] = int(record["output"])
    return records


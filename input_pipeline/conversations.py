"""Your own studies for fine-tuning (and stage 2B): LLaVA's conversation files, or a CSV of image and report.

LLaVA JSON (a list) or JSONL (one record a line); `image` is relative to the file's folder (or absolute), or a
list of such paths for a study (frontal, lateral, prior...; `config.data.max_images` slots a row), one `<image>`
place each in the first human turn, in the list's order:

    {"image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWrite a radiologic report ..."},
                       {"from": "gpt", "value": "FINDINGS: ..."},
                       {"from": "human", "value": "Is there a pneumothorax?"}, {"from": "gpt", "value": "No."}]}

CSV with an `image` and a `report` column, for report-only fine-tuning: each row becomes the release's
report prompt answered by the report (and a record with that report, which stage 2A's report view reads).

Turns alternate human/gpt starting with human and ending with gpt. The first human turn carries the images:
one `<image>` line per image is put in front of it when it has none, and no other turn may have one. Every record is checked before
training starts, and all bad ones are reported together, each with its line in the file.
"""

import json
from pathlib import Path

import numpy as np

from cxrllava_jax import files
from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL, Record

ROLES = {"human": "user", "gpt": "assistant"}
MAX_SHOWN = 20  # bad records listed in one error


def load(path) -> list[Record]:
    """A Record for every line of a .json, .jsonl or .csv file: its image, its conversation (turns of
    {"role", "content"}) and, from a CSV, its report; no labels (they are NaN)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such conversation file")
    readers = {".json": _json_records, ".jsonl": _jsonl_records, ".csv": _csv_records}
    if path.suffix.lower() not in readers:
        raise InputError(f"{path}: conversation files are .json, .jsonl or .csv, not {path.suffix!r}")
    records, problems = [], []
    for line, record in readers[path.suffix.lower()](path):
        try:
            image, turns = _example(record, path.parent)
            records.append(Record(image, np.full(len(CHEXPERT_OBSERVATIONS), np.nan, np.float32),
                                   record.get("report", ""), dataset=path.name, split="", view=FRONTAL,
                                   conversations=[turns], origin=f"{path}:{line}"))
        except InputError as error:
            problems.append(f"{path}:{line}: {error}")
    if problems:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise InputError(f"{len(problems)} bad record(s) in {path}:\n  {shown}{more}")
    if not records:
        raise InputError(f"{path}: no records")
    return records


def _jsonl_records(path: Path):
    for number, text in enumerate(files.read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as error:
            yield number, _Unreadable(f"not JSON: {error.msg} at column {error.colno}")


def _json_records(path: Path):
    """A JSON list, record by record with the line each starts on (json.load alone would not say where)."""
    text = files.read_text(path)
    decoder = json.JSONDecoder()
    position = _skip(text, 0)
    if not text.startswith("[", position):
        raise InputError(f"{path}: a .json conversation file holds a list of records (use .jsonl for one a line)")
    position = _skip(text, position + 1)
    while position < len(text) and not text.startswith("]", position):
        line = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{error.lineno}: not JSON: {error.msg}") from None
        yield line, record
        position = _skip(text, position)
        if text.startswith(",", position):
            position = _skip(text, position + 1)
        elif not text.startswith("]", position):
            raise InputError(f"{path}:{text.count(chr(10), 0, position) + 1}: expected ',' or ']' between records")
    if position >= len(text):
        raise InputError(f"{path}: the JSON list is not closed with ']'")


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _csv_records(path: Path):
    names, records = files.read_csv_records(path)
    missing = {"image", "report"} - set(names)
    if missing:
        raise InputError(f"{path}: a report CSV needs the columns image and report; {sorted(missing)} missing")
    for line, row in records:
        conversation = [{"from": "human", "value": prompting.REPORT_PROMPT}, {"from": "gpt", "value": row["report"]}]
        yield line, {"image": row["image"], "conversations": conversation, "report": row["report"]}


class _Unreadable:
    def __init__(self, reason: str):
        self.reason = reason


def _example(record, root: Path) -> tuple[str | tuple[str, ...], list[dict]]:
    if isinstance(record, _Unreadable):
        raise InputError(record.reason)
    if not isinstance(record, dict):
        raise InputError(f"a record is a JSON object, got {type(record).__name__}")
    image = record.get("image")
    names = image if isinstance(image, list) else [image]
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise InputError("no 'image' path (a path, or a non-empty list of paths)")
    paths = []
    for name in names:
        if not (root / name).is_file():
            raise InputError(f"image {name!r} not found (looked for {root / name})")
        paths.append(str(root / name))
    turns = _turns(record.get("conversations"), len(paths))
    return (tuple(paths) if isinstance(image, list) else paths[0]), turns


def _turns(conversation, images: int) -> list[dict]:
    if not isinstance(conversation, list) or not conversation:
        raise InputError("'conversations' must be a non-empty list of {\"from\", \"value\"} turns")
    turns = []
    for i, turn in enumerate(conversation):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            raise InputError(f"turn {i} is from {speaker!r}; turns alternate human/gpt starting with human")
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"turn {i} has no text 'value'")
        if i > 0 and prompting.IMAGE in value:
            raise InputError(f"turn {i} has {prompting.IMAGE}; only the first human turn carries the image")
        turns.append({"role": ROLES[speaker], "content": value})
    if len(turns) % 2:
        raise InputError("the last turn is human's; a training conversation ends with the gpt answer")
    if prompting.IMAGE not in turns[0]["content"]:
        turns[0]["content"] = f"{prompting.IMAGE}\n" * images + turns[0]["content"]
    prompting.check_image_count(turns, images, "the first human turn")
    return turns

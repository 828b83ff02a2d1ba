"""Training and test splits given as text: index lists such as "0-15,21,23-24" and the split.json file.

The published checkpoints were trained on fixed identity and pose ranges (SPEC.md, "Data layouts").
A generated data set can name other ranges in <dataroot>/split.json, a file the data generator writes:

    {"dataset_mode": "human" | "animal", "train_identities": [ints], "train_poses": [ints],
     "test_identities": [ints], "test_poses": [ints], "epoch_size": int}

Extra keys (counts, provenance) are allowed and ignored.
"""
from __future__ import annotations

import json
import os
import re
import reprlib
from pathlib import Path

from data import DATASETS

SPLIT_FILE_NAME = "split.json"
_INDEX_TOKEN = re.compile(r"(\d+)(?:-(\d+))?")
_INDEX_LIST_KEYS = ("train_identities", "train_poses", "test_identities", "test_poses")


def index_ranges(text: str) -> list[tuple[int, int]]:
    """The inclusive (start, end) ranges of an index list such as "0-15,21,23-24" (21 is (21, 21)), checked but
    not expanded, so that a list's size can be known before its indices are made.

    Args:
        text: comma-separated non-negative integers and ranges; white space around items is ignored.
    """
    ranges = []
    for token in text.split(","):
        match = _INDEX_TOKEN.fullmatch(token.strip())
        if match is None:
            raise ValueError(
                f"index list {text!r} has the malformed item {token.strip()!r}; "
                f"expected comma-separated integers or ranges like '0-15,21,23-24'")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise ValueError(f"index list {text!r} has the range {token.strip()!r}, whose end is below its start")
        ranges.append((start, end))
    return ranges


def parse_index_list(text: str) -> list[int]:
    """The indices of an index list such as "0-15,21,23-24" (`index_ranges`), sorted and without repeats."""
    return sorted({index for start, end in index_ranges(text) for index in range(start, end + 1)})


def is_count(value: object) -> bool:
    """True for a non-negative int; JSON true/false load as bool, a subclass of int, and are not counts."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_split_file(dataroot: str | os.PathLike) -> dict | None:
    """Read and validate <dataroot>/split.json.

    Args:
        dataroot: the data folder.
    Returns:
        None when the folder has no split.json; otherwise a dict with exactly the keys dataset_mode
        (str, a key of data.DATASETS), train_identities, train_poses, test_identities, test_poses
        (non-empty lists of non-negative ints, sorted and without repeats) and epoch_size (int >= 1).
    """
    path = Path(dataroot) / SPLIT_FILE_NAME
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"split file {path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(f"split file {path} must hold a JSON object, got {type(content).__name__}")
    missing = [key for key in ("dataset_mode", *_INDEX_LIST_KEYS, "epoch_size") if key not in content]
    if missing:
        raise ValueError(f"split file {path} lacks the keys {missing}")
    if content["dataset_mode"] not in DATASETS:
        raise ValueError(
            f"split file {path} key 'dataset_mode' must be one of {sorted(DATASETS)}, "
            f"got {reprlib.repr(content['dataset_mode'])}")
    split = {"dataset_mode": content["dataset_mode"]}
    for key in _INDEX_LIST_KEYS:
        value = content[key]
        if not isinstance(value, list) or not value or not all(is_count(item) for item in value):
            raise ValueError(
                f"split file {path} key {key!r} must be a non-empty list of non-negative integers, "
                f"got {reprlib.repr(value)}")
        split[key] = sorted(set(value))
    if not is_count(content["epoch_size"]) or content["epoch_size"] == 0:
        raise ValueError(
            f"split file {path} key 'epoch_size' must be a positive integer, got {reprlib.repr(content['epoch_size'])}")
    split["epoch_size"] = content["epoch_size"]
    return split

"""Tests for data/split.py: index-list parsing and split.json validation."""
from __future__ import annotations

import json
import random
import re

import pytest

from data.split import parse_index_list, read_split_file

VALID_SPLIT = {
    "dataset_mode": "animal",
    "train_identities": [3, 0, 1],
    "train_poses": [0, 1, 2, 2],
    "test_identities": [5],
    "test_poses": [7, 8],
    "epoch_size": 12,
}


def _parse_index_list_naive(text: str) -> list[int]:
    """Expand every item by brute force over a small universe."""
    selected = set()
    for item in text.split(","):
        bounds = [int(part) for part in item.split("-")]
        selected.update(k for k in range(100) if bounds[0] <= k <= bounds[-1])
    return sorted(selected)


def test_parse_index_list_example():
    assert parse_index_list("0-15,21,23-24") == [*range(16), 21, 23, 24]


def test_parse_index_list_matches_naive_on_random_lists():
    rng = random.Random(0)
    for _ in range(200):
        items = []
        for _ in range(rng.randint(1, 5)):
            start = rng.randint(0, 60)
            items.append(str(start) if rng.random() < 0.5 else f"{start}-{start + rng.randint(0, 30)}")
        text = ",".join(items)
        assert parse_index_list(text) == _parse_index_list_naive(text), text
        assert parse_index_list(" , ".join(items)) == _parse_index_list_naive(text), text


@pytest.mark.parametrize("text", ["", "1,,2", "a", "3-", "-3", "1-2-3", "1.5", "4-2", "7,"])
def test_parse_index_list_rejects_malformed_text(text):
    with pytest.raises(ValueError, match=re.escape(f"index list {text!r}")):
        parse_index_list(text)


def _write_split(tmp_path, content) -> None:
    (tmp_path / "split.json").write_text(json.dumps(content) if not isinstance(content, str) else content)


def test_read_split_file_absent_gives_none(tmp_path):
    assert read_split_file(tmp_path) is None


def test_read_split_file_valid(tmp_path):
    _write_split(tmp_path, {**VALID_SPLIT, "num_meshes": 99})
    split = read_split_file(tmp_path)
    assert set(split) == set(VALID_SPLIT)
    assert split["dataset_mode"] == "animal" and split["epoch_size"] == 12
    for key in ("train_identities", "train_poses", "test_identities", "test_poses"):
        assert split[key] == sorted(set(VALID_SPLIT[key]))


@pytest.mark.parametrize(
    "key, value",
    [
        ("dataset_mode", "dragon"),
        ("dataset_mode", 3),
        ("train_identities", []),
        ("train_identities", "0-15"),
        ("train_poses", [1, -2]),
        ("test_identities", [1.0]),
        ("test_poses", [True]),
        ("epoch_size", 0),
        ("epoch_size", "100"),
        ("epoch_size", 2.5),
    ],
)
def test_read_split_file_names_file_and_bad_key(tmp_path, key, value):
    _write_split(tmp_path, {**VALID_SPLIT, key: value})
    with pytest.raises(ValueError, match=re.escape(f"split file {tmp_path / 'split.json'} key '{key}'")):
        read_split_file(tmp_path)


def test_read_split_file_missing_key(tmp_path):
    _write_split(tmp_path, {key: value for key, value in VALID_SPLIT.items() if key != "train_poses"})
    with pytest.raises(ValueError, match=r"lacks the keys \['train_poses'\]"):
        read_split_file(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_read_split_file_rejects_non_object(tmp_path, text):
    _write_split(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"split file {tmp_path / 'split.json'}")):
        read_split_file(tmp_path)

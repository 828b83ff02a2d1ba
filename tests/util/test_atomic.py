"""Atomic writes refuse, with one sentence, a destination that cannot be a file."""
import pytest

from util.atomic import atomic_write_text


def test_a_file_on_the_way_or_a_folder_as_destination_is_named(tmp_path):
    (tmp_path / "results").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match=r"cannot write .*results/human/pmd.csv: .*results is a file, not a folder"):
        atomic_write_text("x", tmp_path / "results" / "human" / "pmd.csv")
    with pytest.raises(ValueError, match=r"cannot write .*: it is a folder; name a file"):
        atomic_write_text("x", tmp_path)
    assert (tmp_path / "results").read_text() == "a file where a folder should be"
    atomic_write_text("x", tmp_path / "new" / "deeper" / "file.txt")
    assert (tmp_path / "new" / "deeper" / "file.txt").read_text() == "x"

"""Atomic output directories: all or nothing, with a plain mkdir's permissions."""

import os
import stat

import pytest

from edgeprune.io import atomic_dir, write_json


def test_atomic_dir_publishes_with_a_plain_mkdirs_mode(tmp_path):
    with atomic_dir(tmp_path / "art") as tmp:
        (tmp / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o777 & ~mask
    assert (tmp_path / "art" / "f").read_text() == "x"


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "art") as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert [p.name for p in (tmp_path / "art").iterdir()] == ["old"]


def test_write_json_publishes_with_a_plain_files_mode(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

"""Atomic writes, permissions from the umask, and cleanup of what a killed run left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from diffmem.files import atomic_write_text, remove_stale_temp, replace_dir, write_json


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_write_json_is_strict_json_with_sorted_keys(tmp_path):
    path = write_json(tmp_path / "r.json", {"b": float("nan"), "a": [1.0, float("inf")]})
    text = path.read_text()
    assert json.loads(text) == {"a": [1.0, None], "b": None}
    assert text.index('"a"') < text.index('"b"') and "NaN" not in text


def test_a_killed_run_leaves_a_temp_folder_that_the_next_run_removes(tmp_path, caplog):
    out = tmp_path / "out"
    code = (
        "import os, sys\n"
        "from diffmem.files import replace_dir\n"
        "replace_dir(sys.argv[1], lambda f: ((f / 'half').write_text('1'), os.kill(os.getpid(), 9)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)])
    assert done.returncode == -9
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out.tmp-") and not out.exists()
    (tmp_path / ".out.tmp-notours").mkdir()  # not a name diffmem makes: never touched
    replace_dir(out, lambda f: (f / "done").write_text("2"))
    assert (out / "done").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-notours", "out"]
    assert "interrupted diffmem run" in caplog.text


def test_a_temp_folder_of_a_live_run_is_left_alone(tmp_path):
    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    assert remove_stale_temp(tmp_path / "out") == [] and live.is_dir()


def test_a_failed_fill_leaves_the_old_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    replace_dir(out, lambda f: (f / "v1").write_text("1"))

    def broken(folder):
        (folder / "v2").write_text("2")
        raise OSError("disk full")

    with pytest.raises(Exception, match="disk full"):
        replace_dir(out, broken)
    assert sorted(p.name for p in out.iterdir()) == ["v1"] and len(list(tmp_path.iterdir())) == 1

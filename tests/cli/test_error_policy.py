"""The command line's error policy: a user error is one line and exit status 2; a bug keeps its traceback (exit 1).

User errors are diffmem's own: argparse rejecting a flag, a :class:`~diffmem.errors.DiffmemError` (a missing or
malformed file, a :class:`~diffmem.errors.ConfigError` from a config check) or an OS error on a named path. Any
other exception, a plain ``ValueError`` included, is a bug and must not be disguised as a user error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffmem
from diffmem.cli import main
from diffmem.config import LocateConfig
from diffmem.errors import ConfigError, DiffmemError
from diffmem.edits import Mask

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mask_file(tmp_path):
    """A small mask saved by diffmem (no model needed: ``diffmem iou`` reads masks only)."""
    return Mask({"down.ff.net.2": torch.tensor([[True, False], [False, True]])}).save(tmp_path / "mask")


def _python(argv: list[str], tmp_path: Path, sitecustomize: str | None = None) -> subprocess.CompletedProcess:
    """``python -m diffmem ARGV`` in a fresh interpreter, optionally with a ``sitecustomize`` run at start-up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = [str(REPO)]
    if sitecustomize is not None:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    return subprocess.run([sys.executable, "-m", "diffmem", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def test_config_error_is_a_diffmem_error_and_a_value_error():
    assert issubclass(ConfigError, DiffmemError) and issubclass(ConfigError, ValueError)
    assert diffmem.ConfigError is ConfigError
    with pytest.raises(ConfigError, match="ratio=1.5 is invalid"):
        LocateConfig(ratio=1.5)
    with pytest.raises(ValueError, match="ratio=1.5 is invalid"):  # code written against ValueError still works
        LocateConfig(ratio=1.5)


def test_out_of_range_value_is_one_line_and_exit_2(mask_file, tmp_path):
    res = _python(["locate", tmp_path / "model", "--memorized", mask_file, "--base", mask_file,
                   "--out", tmp_path / "m.safetensors", "--ratio", "1.5"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("diffmem: error:") and res.stderr.count("\n") == 1, res.stderr
    assert "--ratio" in res.stderr and "1.5" in res.stderr and "Traceback" not in res.stderr


def test_config_check_in_the_library_is_one_line_and_exit_2(mask_file, tmp_path, capsys, monkeypatch):
    """A value that passes argparse but fails a config check deeper down is still the user's error."""
    import diffmem.edits

    def check(a, b):
        LocateConfig(ratio=0.0)  # what a library config check raises for a value the user gave

    monkeypatch.setattr(diffmem.edits, "mask_iou", check)
    assert main(["iou", str(mask_file), str(mask_file)]) == 2
    err = capsys.readouterr().err
    assert err == "diffmem: error: ratio=0.0 is invalid: must be in (0, 1]\n"


def test_missing_file_is_one_line_and_exit_2(mask_file, tmp_path, capsys):
    assert main(["iou", str(mask_file), str(tmp_path / "absent.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error:") and err.count("\n") == 1 and "absent.safetensors" in err


@pytest.mark.parametrize("bug", [RuntimeError("boom"), KeyError("layer"), ValueError("internal invariant broke"),
                                 TypeError("bad call"), PermissionError("no filename: not a user path")])
def test_a_bug_propagates_with_its_type(bug, mask_file, capsys, monkeypatch):
    import diffmem.edits

    def broken(a, b):
        raise bug

    monkeypatch.setattr(diffmem.edits, "mask_iou", broken)
    with pytest.raises(type(bug)) as caught:
        main(["iou", str(mask_file), str(mask_file)])
    assert caught.value is bug
    assert "diffmem: error:" not in capsys.readouterr().err


def test_an_os_error_on_a_named_path_is_the_users(mask_file, tmp_path, capsys, monkeypatch):
    import diffmem.edits

    def denied(a, b):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(diffmem.edits, "mask_iou", denied)
    assert main(["iou", str(mask_file), str(mask_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error:") and err.count("\n") == 1 and "locked" in err


def test_a_bug_shows_its_traceback_and_exits_1(mask_file, tmp_path):
    """An internal ValueError (once reported as a user error) now ends in a traceback and exit status 1."""
    res = _python(["iou", mask_file, mask_file], tmp_path, sitecustomize="""
        import diffmem.edits

        def mask_iou(a, b):
            raise ValueError("internal invariant broke")

        diffmem.edits.mask_iou = mask_iou
    """)
    assert res.returncode == 1, res.stderr
    assert "Traceback (most recent call last)" in res.stderr
    assert "ValueError: internal invariant broke" in res.stderr and "diffmem: error:" not in res.stderr


def test_a_working_command_exits_0(mask_file, tmp_path):
    res = _python(["iou", mask_file, mask_file], tmp_path)
    assert res.returncode == 0 and '"overall": 1.0' in res.stdout, res.stderr


def test_mitigate_robust_fraction_out_of_range_is_one_line_and_writes_nothing(tmp_path, capsys):
    """``--robust-fraction`` is checked before the model loads; the output folder is never created."""
    from diffmem.workflows.mitigate import MitigateRunConfig

    model = REPO / "assets" / "tiny-sd-memorizer"
    with pytest.raises(ConfigError, match=r"robust_fraction=0.5 is invalid: must be in \(0, 0.1\]"):
        MitigateRunConfig(model=str(model), prompts=str(model / "memorization.jsonl"), out=str(tmp_path / "o"),
                          robust_fraction=0.5)
    out = tmp_path / "out"
    assert main(["mitigate", str(model), "--prompts", str(model / "memorization.jsonl"), "--out", str(out),
                 "--robust-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error:") and err.count("\n") == 1 and "robust_fraction=0.0" in err, err
    assert not out.exists()

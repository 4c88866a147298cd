"""The CLI's choices come from the registries: a locator registered by a plugin is a valid ``--method``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffmem.cli import build_parser, main

LOCATE = ["locate", "model", "--memorized", "mem.safetensors", "--base", "base.safetensors", "--out", "edit"]


@pytest.fixture
def toy_locator(monkeypatch):
    import diffmem.localization as localization

    monkeypatch.setattr(localization, "_LOCATORS", dict(localization._LOCATORS))  # undone after the test
    localization.register_locator("toy", localization.select_wanda)
    return "toy"


def test_a_registered_locator_reaches_locate_and_mitigate(toy_locator):
    from diffmem.mitigation import MitigateConfig

    parser = build_parser()
    assert parser.parse_args([*LOCATE, "--method", toy_locator]).method == toy_locator
    args = parser.parse_args(["mitigate", "model", "--prompts", "m.jsonl", "--out", "o", "--method", toy_locator])
    assert args.method == toy_locator
    assert MitigateConfig(method=toy_locator).method == toy_locator
    locate_help = next(a for a in parser._actions if a.dest == "command").choices["locate"].format_help()
    assert "{wanda,neuron,directions,toy}" in locate_help


def test_an_unregistered_locator_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*LOCATE, "--method", "toy"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error: locate: argument --method: invalid choice: 'toy'") and err.count("\n") == 1
    assert "'wanda', 'neuron', 'directions'" in err


def test_an_unregistered_locator_is_refused_by_the_mitigate_config():
    from diffmem.errors import ConfigError
    from diffmem.mitigation import MitigateConfig

    with pytest.raises(ConfigError, match="method='toy' is invalid: choose one of directions, neuron, wanda"):
        MitigateConfig(method="toy")


def test_building_the_parser_and_the_locate_help_import_no_torch():
    code = ("import sys; from diffmem.cli import build_parser; p = build_parser(); p.format_help(); "
            "p.parse_args(['locate', 'm', '--memorized', 'a', '--base', 'b', '--out', 'c', '--method', 'neuron']); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('diffmem'))")
    subprocess.run([sys.executable, "-c", code], check=True)

"""The catalogue commands: `zoo list` filters and formats, `zoo card` prints and writes the recipe cards."""

from __future__ import annotations

import re

import pytest

import zoo
from zoo.cards import render_card, render_index
from zoo.cli import main


@pytest.fixture(autouse=True)
def _private_count_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "zoo-cache"))


def test_list_filters_by_family_and_size(capsys):
    assert main(["list", "--family", "moe-llava", "--no-tiny"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == zoo.list_models(family="moe-llava", tiny=False) == [
        "moe-llava-phi2-2.7b-4e", "moe-llava-phi2-2.7b-4e-384", "moe-llava-qwen-1.8b-4e",
        "moe-llava-stablelm-1.6b-4e", "tiny-moe-llava"]
    assert main(["list", "--family", "moiie", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| name | family | vision | connector | lm | sparsity | total | active |")
    assert "| `moiie-phi3` | moiie |" in out and "| 7.89B | 5.47B |" in out


def test_card_prints_one_and_writes_all(capsys, tmp_path):
    assert main(["card", "moiie-phi3-tiny"]) == 0
    assert capsys.readouterr().out == render_card("moiie-phi3-tiny")
    assert main(["card", "--all", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == render_index()
    assert (tmp_path / "moiie-phi3.md").read_text() == render_card("moiie-phi3")
    capsys.readouterr()
    assert main(["card", "nope"]) == 2  # a user error: one line on stderr
    assert re.fullmatch(r"zoo card: error: unknown model 'nope' Registered models: .*moiie-phi3.*\n",
                        capsys.readouterr().err)

"""The command line and the demo pipeline, end to end on the real easy-vqa data (short schedule)."""

import json

import zoo
from zoo.cli import main


def test_cli_list_prints_catalogue(capsys, tmp_path, monkeypatch):
    from zoo.cards import billions

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "vision", "connector", "lm", "sparsity", "total", "active"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == zoo.list_models()
    for name in ("tiny-moe-llava", "moe-llava-phi2-2.7b-4e", "mocha-phi2-tiny"):  # counts of zoo.param_counts
        counts = zoo.param_counts(name)
        assert rows[name][-2:] == [billions(counts.total), billions(counts.active)], name
    assert rows["moe-llava-phi2-2.7b-4e"][-2:] == ["5.61B", "3.93B"]


def test_cli_build_saves_a_loadable_model(tmp_path, capsys):
    assert main(["build", "llava-1.5-7b-tiny", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "llava-1.5-7b-tiny" in out and "tokens per image" in out
    model = zoo.load(tmp_path / "m")
    assert model.num_image_tokens == 16  # 56 px / 14 px patches, CLS dropped


def test_demo_trains_evaluates_saves_and_reloads(tmp_path, capsys):
    assert main(["demo", "--steps", "40", "--limit", "300", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["questions"]["overall"] == 300
    acc = results["accuracy"]
    assert set(acc) == {"overall", "colour", "shape", "yes/no", "majority baseline"}
    assert 0.0 <= acc["overall"] <= 1.0
    assert "identical before and after reload" in out and "| overall | 300 |" in out
    assert set(results["seconds"]) >= {"train (dense stage)", "upcycle + MoE-tune", "evaluate", "save + reload"}
    # the MoE stage upcycled the LM; dropless top-2 routing sends each of the 16 image tokens of the 512 probe
    # samples to exactly two experts in every sparse layer
    load = results["expert_load"]
    assert load and "expert load" in out
    for layer in load.values():
        assert sum(layer["image"]) == 512 * 16 * 2
        assert sum(layer["text"]) > 0 and min(layer["image"] + layer["text"]) >= 0
    reloaded = zoo.load(tmp_path / "demo" / "model")
    assert reloaded.config.name == "tiny-llava"
    assert reloaded.config.lm.sparsity is not None and reloaded.config.lm.sparsity.preset == "moe-llava"

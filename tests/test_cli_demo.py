"""The command line: the catalogue listing and building a model (the demo: tests/test_easy_vqa_pipeline.py)."""


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

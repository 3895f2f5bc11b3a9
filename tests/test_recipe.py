"""Staged recipes (zoo.train.recipe): the tiny-twin recipes run every stage with their boundary actions, the loss
falls in each stage, MoE-LLaVA's stage III trains only FFNs and routers, overrides and errors name fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.config import ConfigError
from zoo.train.recipe import apply_overrides, load_recipe, run_recipe, set_trainable

RECIPES = Path(__file__).parent.parent / "configs" / "recipes"


def test_moe_llava_recipe_runs_three_stages_and_stage_three_trains_only_ffns_and_routers(tmp_path):
    recipe = load_recipe(RECIPES / "moe-llava-tiny.yaml", ["data.easy-vqa.limit=1500"])
    model = run_recipe(recipe, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert list(info["stages"]) == ["align", "instruct", "moe"]
    for name, stage in info["stages"].items():
        assert stage["loss_last_fifth"] < stage["loss_first_fifth"], name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    routers = {n for n in trainable if n.endswith("router.weight")}
    assert len(routers) == 1  # 2 LM layers, the even one (0) is sparse
    assert any("layers.1.mlp" in n for n in trainable)  # the released code also trains the dense FFNs
    # each stage exported a loadable model; the last is sparse
    final = zoo.load(str(tmp_path / "run" / "02-moe" / "model"))
    assert final.config.lm.sparsity.preset == "moe-llava"
    assert (tmp_path / "run" / "recipe.yaml").exists() and torch.__version__.startswith(info["versions"]["torch"])


def test_recipe_resume_loads_finished_stages(tmp_path):
    args = ["train", str(RECIPES / "llava-1.5-tiny.yaml"), "--run-dir", str(tmp_path / "run"), "--no-progress",
            "--set", "stages.0.train.steps=5", "--set", "stages.1.train.steps=5", "--set", "data.easy-vqa.limit=300"]
    assert main(args) == 0
    export = tmp_path / "run" / "01-instruct" / "model" / "model.safetensors"
    stamp = export.stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert export.stat().st_mtime_ns == stamp  # nothing retrained


def test_overrides_and_errors_name_the_field(tmp_path):
    data = {"stages": [{"name": "a", "train": {"steps": 3}}]}
    assert apply_overrides(data, ["stages.0.train.steps=7"])["stages"][0]["train"]["steps"] == 7
    with pytest.raises(ConfigError, match=r"--set stages\.3\.name: no element"):
        apply_overrides(data, ["stages.3.name=x"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train\.stepz"):
        load_recipe(RECIPES / "llava-1.5-tiny.yaml", ["stages.0.train.stepz=3"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data: unknown source\(s\) \['coco'\]"):
        load_recipe(RECIPES / "llava-1.5-tiny.yaml", ["stages.0.data={coco: 1.0}"])
    model = zoo.build("tiny-llava")
    with pytest.raises(ConfigError, match=r"trainable: \['lm\.\*\.mlpp\.\*'\] match no parameter"):
        set_trainable(model, ["connector", "lm.*.mlpp.*"])


@pytest.mark.parametrize("name", ["moiie-tiny"])
def test_other_tiny_recipes_run(name, tmp_path):
    recipe = load_recipe(RECIPES / f"{name}.yaml", ["data.easy-vqa.limit=1500"])
    run_recipe(recipe, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(info["stages"]) == len(recipe.stages)
    for stage in info["stages"].values():
        assert stage["loss_last_fifth"] < stage["loss_first_fifth"]

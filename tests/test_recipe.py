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


SMALL = {"moiie-tiny": 20, "cumo-tiny": 12, "mocha-tiny": 12}  # steps per stage, batch 16


@pytest.mark.parametrize("name", list(SMALL))
def test_other_tiny_recipes_run_every_stage_and_the_loss_falls(name, tmp_path):
    recipe = load_recipe(RECIPES / f"{name}.yaml", ["data.easy-vqa.limit=1000"])
    for stage in recipe.stages:
        stage.train.steps, stage.train.batch_size = SMALL[name], 16
    model = run_recipe(recipe, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert list(info["stages"]) == [s.name for s in recipe.stages]
    for stage_name, stage in info["stages"].items():
        assert stage["loss_last_fifth"] < stage["loss_first_fifth"], stage_name
    last = tmp_path / "run" / f"{len(recipe.stages) - 1:02d}-{recipe.stages[-1].name}"
    routed = {"moiie-tiny": {"lm.layers.1 image", "lm.layers.1 text"}, "cumo-tiny": {"connector image"},
              "mocha-tiny": {f"connector.{i} image" for i in range(4)}}[name]
    assert routed <= set(info["stages"][recipe.stages[-1].name]["routing"])
    assert (last / "routing.png").stat().st_size > 0
    exported = zoo.load(str(last / "model"))
    assert exported.config.connector.kind == {"cumo-tiny": "moe_mlp", "mocha-tiny": "mocha"}.get(name, "mlp")
    if name == "cumo-tiny":  # connector and CLIP co-upcycled at the SFT boundary, trained with their aux losses
        assert model.config.connector.coefficients == {"balance": 0.1, "z_loss": 0.01}
        dense = zoo.load(str(tmp_path / "run" / "01-pft" / "model")).config
        assert dense.connector.kind == "mlp" and dense.vision.sparsity is None
        assert exported.config.vision.sparsity.preset == "cumo"
        assert {"vision.layers.0 image", "vision.layers.0 all"} & set(info["stages"]["sft"]["routing"])


def _dense(name: str, overrides: list[str]):
    from zoo.config import ModelConfig

    return zoo.build(ModelConfig.from_dict(apply_overrides(zoo.get_config(name).to_dict(), overrides)))


@pytest.mark.parametrize("name, overrides, options, kind", [
    ("cumo-mistral-7b-tiny", ["connector.kind=mlp", "connector.moe={}", "connector.coefficients={}"], {}, "moe_mlp"),
    ("mocha-phi2-tiny", ["connector.kind=mlp", "connector.moe={}", "connector.coefficients={}",
                         "connector.options={}"], {"hga": "none"}, "mocha"),
])
def test_co_upcycle_keeps_the_model_output_and_records_the_new_connector(name, overrides, options, kind, tmp_path):
    from zoo.train.recipe import ACTIONS, ActionConfig

    if name not in zoo.list_models():
        pytest.skip(f"catalogue entry {name} not present yet")
    torch.manual_seed(0)
    model = _dense(name, overrides).eval()
    batch = _image_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
    ACTIONS.get("co_upcycle")(model, ActionConfig("co_upcycle", policy={"num_experts": 3, "top_k": 2},
                                                   options=options))
    assert model.config.connector.kind == kind and model.config.connector.moe["num_experts"] == 3
    assert model.config.connector.coefficients == {"balance": 0.1, "z_loss": 0.01}  # CuMo's, by default
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.logits, before, rtol=0, atol=1e-5)  # every expert is a copy of the MLP
    assert any(k.startswith("connector") for k in out.routing_stats)
    model.save_pretrained(tmp_path / "ckpt")
    assert zoo.load(str(tmp_path / "ckpt")).config.connector.kind == kind
    with pytest.raises(ConfigError, match=r"co_upcycle needs an mlp connector"):
        ACTIONS.get("co_upcycle")(model, ActionConfig("co_upcycle"))


def _image_batch(model):
    from PIL import Image

    from zoo.train.conversations import Conversation, ConversationStream

    images = [Image.new("RGB", (64, 64), c) for c in [(200, 20, 20), (20, 20, 200)]]
    samples = [Conversation(f"s{i}", [("user", "what color is the shape?"), ("assistant", "red")], [im])
               for i, im in enumerate(images)]
    stream = ConversationStream(model, [samples], template="zoo")
    return stream.collate(list(stream))


REAL = {"llava-1.5-7b": "llava-1.5-tiny", "moe-llava-phi2-2.7b-4e": "moe-llava-tiny", "moiie-phi3": "moiie-tiny",
        "cumo-mistral-7b": "cumo-tiny", "mocha-phi2": "mocha-tiny"}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_recipes_parse_and_mirror_their_tiny_twins(name):
    from zoo.config import ModelConfig, SparsityConfig, from_dict
    from zoo.train.strategy import STRATEGIES

    recipe, twin = load_recipe(RECIPES / f"{name}.yaml"), load_recipe(RECIPES / f"{REAL[name]}.yaml")
    assert [s.name for s in recipe.stages] == [s.name for s in twin.stages]
    assert [[a.action for a in s.before] for s in recipe.stages] == [[a.action for a in s.before] for s in twin.stages]
    assert [s.trainable for s in recipe.stages] == [s.trainable for s in twin.stages]
    for stage in recipe.stages:
        assert stage.train.steps > 0 and stage.train.strategy in STRATEGIES and stage.train.devices == 8
        for action in stage.before:
            if action.action == "sparsify":
                from_dict(SparsityConfig, dict(action.policy))
    if recipe.model not in zoo.list_models():
        pytest.skip(f"catalogue entry {recipe.model} not present yet")
    config = ModelConfig.from_dict(apply_overrides(zoo.get_config(recipe.model).to_dict(), recipe.model_overrides))
    if any(a.action == "sparsify" for s in recipe.stages for a in s.before):
        assert config.lm.sparsity is None  # the dense start; the boundary action upcycles
    if any(a.action == "co_upcycle" for s in recipe.stages for a in s.before):
        assert config.connector.kind == "mlp"

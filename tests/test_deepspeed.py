"""DeepSpeed for MoE-LLaVA users. On CPU (DeepSpeed's own engine over gloo, as Lightning refuses DeepSpeed on CPU;
the runs are tests/distributed_worker.py's ``deepspeed`` task on 2 processes): a tiny sparse zoo LLaVA under
``deepspeed.initialize`` with ZeRO-2 and ZeRO-3 (MoE-LLaVA's zero2.json read by `zoo.train.deepspeed`) trains like
torch DDP (losses within 1e-5), and the zoo's ``moe-llava`` layer equals ``deepspeed.moe.layer.MoE`` on the same
weights (train mode: capacity 1.5 with dropped slots; eval: 2.0; no Gumbel sampling) within 1e-6. The strategy by
name and the user's DeepSpeed JSON fail with one-line errors naming the field."""

from __future__ import annotations

import json

import pytest

import zoo
from zoo.config import ConfigError
from zoo.train.deepspeed import read_deepspeed_config
from zoo.train.strategy import build_strategy


def test_zero2_and_zero3_train_like_ddp(distributed):
    for rank in distributed["deepspeed"]:
        losses = rank["losses"]
        assert losses["ddp"][-1] < losses["ddp"][0] - 0.5
        for engine in ("zero2", "zero3"):
            assert max(abs(a - b) for a, b in zip(losses[engine], losses["ddp"])) < 1e-5, (engine, losses)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_moe_llava_layer_equals_deepspeed_moe_on_the_same_weights(distributed, mode):
    got = distributed["deepspeed"][0]["layer"][mode]
    assert got["output"] <= 1e-6 and got["input_grad"] <= 1e-6 and got["router_grad"] <= 1e-6, got
    assert got["balance"] <= 1e-6  # DeepSpeed's l_aux is the Switch loss the preset uses
    assert (got["dropped"] > 0) == (mode == "train")  # capacity 1.5 drops slots here, 2.0 does not


def test_deepspeed_json_is_read_strictly(tmp_path):
    good = tmp_path / "zero2.json"
    good.write_text(json.dumps({"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                                "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": "auto"}}))
    assert read_deepspeed_config(good, 2) == {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"^train\.deepspeed_config: .*bad\.json is not valid JSON \(line 1, column"):
        read_deepspeed_config(bad, 2)
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    with pytest.raises(ConfigError, match=r"owned\.json sets 'optimizer', which the recipe sets too"):
        read_deepspeed_config(owned, 2)
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage is 2, but train\.strategy is 'deepspeed_stage_3'"):
        read_deepspeed_config(good, 3)
    with pytest.raises(ConfigError, match=r"^train\.deepspeed_config: .*missing\.json: cannot be read"):
        read_deepspeed_config(tmp_path / "missing.json", 2)


def test_deepspeed_strategies_by_name_and_their_errors(tmp_path, monkeypatch):
    import importlib.util

    import torch

    model = zoo.build("tiny-moe-llava")
    built = build_strategy("deepspeed_stage_3", model, require_device=False)
    assert built.config["zero_optimization"]["stage"] == 3
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^train\.strategy: 'deepspeed_stage_3' runs on CUDA devices only"):
            build_strategy("deepspeed_stage_3", model)
    with pytest.raises(ConfigError, match=r"^train\.deepspeed_config: only for the deepspeed_stage_2/3 strategies"):
        build_strategy("ddp", model, deepspeed_config=str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match=r"^train\.expert_parallel: 2 runs with strategy ddp or fsdp"):
        build_strategy("deepspeed_stage_2", model, expert_parallel=2, devices=2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'deepspeed_stage_2' needs DeepSpeed, which is not installed"):
        build_strategy("deepspeed_stage_2", model)

"""Value ranges are checked where a config is read: a recipe (as `zoo train --set` reads it) or a model config; the
error names the field's full path and the value. A few depend on the built model (image tokens vs max_length, a
tower that yields no token) and are checked when it is built, before any training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_config

import zoo
from zoo.config import ConfigError, ModelConfig
from zoo.train.recipe import apply_overrides, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "llava-1.5-tiny.yaml"
MOE = "{action: sparsify, policy: {preset: moe-llava, moe: %s}}"

# (--set overrides, the error after the file name)
RECIPE_RANGES = [
    ("stages.0.train.steps=0", r"stages\[0\]\.train\.steps: must be >= 1, got 0"),
    ("stages.0.train.steps=-3", r"stages\[0\]\.train\.steps: must be >= 1, got -3"),
    ("stages.1.train.batch_size=0", r"stages\[1\]\.train\.batch_size: must be >= 1, got 0"),
    ("stages.0.train.questions_per_image=0", r"stages\[0\]\.train\.questions_per_image: must be >= 1, got 0"),
    ("stages.0.train.accumulate_grad_batches=0", r"stages\[0\]\.train\.accumulate_grad_batches: must be >= 1, got 0"),
    ("stages.0.train.checkpoint_every=-1", r"stages\[0\]\.train\.checkpoint_every: must be >= 0, got -1"),
    ("stages.0.train.lr=0", r"stages\[0\]\.train\.lr: must be a finite number > 0, got 0\.0"),
    ("stages.0.train.lr=-1.0e-3", r"stages\[0\]\.train\.lr: must be a finite number > 0, got -0\.001"),
    ("stages.0.train.lr=.nan", r"stages\[0\]\.train\.lr: must be a finite number > 0, got nan"),
    ("stages.0.train.lr_scale={vision: -2.0}", r"stages\[0\]\.train\.lr_scale\.vision: must be a finite number >= 0"),
    ("stages.0.train.weight_decay=-0.1", r"stages\[0\]\.train\.weight_decay: must be a finite number >= 0"),
    ("stages.0.train.grad_clip=-1.0", r"stages\[0\]\.train\.grad_clip: must be a finite number >= 0 \(0: no clip"),
    ("stages.0.train.warmup_ratio=1.5", r"stages\[0\]\.train\.warmup_ratio: must be in \[0, 1\], got 1\.5"),
    ("stages.0.train.min_lr_ratio=-0.1", r"stages\[0\]\.train\.min_lr_ratio: must be in \[0, 1\], got -0\.1"),
    ("stages.0.train.devices=0", r"stages\[0\]\.train\.devices: must be an integer >= 1 or 'auto', got 0"),
    ("stages.0.train.strategy=ddpp", r"stages\[0\]\.train\.strategy: expected one of auto, ddp, .*, got 'ddpp'"),
    ("stages.0.data={easy-vqa: 0}", r"stages\[0\]\.data\.easy-vqa: a mixing weight must be > 0, got 0"),
    ("stages.0.template=vicuna", r"stages\[0\]\.template: unknown template 'vicuna'; templates: .*vicuna_v1"),
    ("data.easy-vqa.limit=0", r"data\.easy-vqa\.limit: must be >= 1 \(or null for all samples\), got 0"),
    (f"stages.1.before=[{MOE % '{num_experts: 0}'}]",
     r"stages\[1\]\.before\[0\]\.policy\.moe\.num_experts: must be >= 1, got 0"),
    (f"stages.1.before=[{MOE % '{top_k: 5}'}]",
     r"stages\[1\]\.before\[0\]\.policy\.moe\.top_k: must be <= num_experts \+ null_experts \(4\), got 5"),
    (f"stages.1.before=[{MOE % '{capacity_factor: 0}'}]",
     r"stages\[1\]\.before\[0\]\.policy\.moe\.capacity_factor: must be > 0 \(or null for dropless routing\)"),
    (f"stages.1.before=[{MOE % '{eval_capacity_factor: -1.0}'}]",
     r"stages\[1\]\.before\[0\]\.policy\.moe\.eval_capacity_factor: must be > 0"),
    ("stages.1.before=[{action: co_upcycle, policy: {num_experts: 2, top_k: 3}}]",
     r"stages\[1\]\.before\[0\]\.policy\.top_k: must be <= num_experts \+ null_experts \(2\), got 3"),
]


@pytest.mark.parametrize("override, message", RECIPE_RANGES, ids=[o for o, _ in RECIPE_RANGES])
def test_recipe_value_ranges_name_the_field(override, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(RECIPE))}: {message}"):
        load_recipe(RECIPE, [override])


# (overrides of the tiny-llava model config, the error)
MODEL_RANGES = [
    ("vision.image_size=0", r"vision\.image_size: must be >= 1 pixel \(or null for the model's own\), got 0"),
    ("vision.std=[0.2, 0.0, 0.2]", r"vision\.std: every value must be > 0"),
    ("max_length=1", r"max_length: must be >= 2 \(an image and an answer token\), got 1"),
    ("lm.sparsity={preset: moe-llava, moe: {num_experts: 0}}", r"lm\.sparsity\.moe\.num_experts: must be >= 1, got 0"),
    ("lm.sparsity={preset: moe-llava, moe: {top_k: 5}}",
     r"lm\.sparsity\.moe\.top_k: must be <= num_experts \+ null_experts \(4\), got 5"),
    ("lm.sparsity={preset: moe-llava, moe: {capacity_factor: -1.5}}", r"lm\.sparsity\.moe\.capacity_factor: must be > 0"),
    ("lm.sparsity={preset: moe-llava, coefficients: {balance: -0.01}}",
     r"lm\.sparsity\.coefficients\.balance: must be a finite number >= 0, got -0\.01"),
    ("connector={kind: moe_mlp, moe: {num_experts: 4, top_k: 6}}",
     r"connector\.moe\.top_k: must be <= num_experts \+ null_experts \(4\), got 6"),
    ("connector={kind: moe_mlp, moe: {min_capacity: -1}}", r"connector\.moe\.min_capacity: must be >= 0, got -1"),
    ("connector={kind: moe_mlp, coefficients: {z_loss: -1.0}}", r"connector\.coefficients\.z_loss: must be a finite"),
]


@pytest.mark.parametrize("override, message", MODEL_RANGES, ids=[o for o, _ in MODEL_RANGES])
def test_model_config_value_ranges_name_the_field(override, message):
    with pytest.raises(ConfigError, match=rf"^{message}"):
        ModelConfig.from_dict(apply_overrides(tiny_config().to_dict(), [override]))


def test_ranges_that_need_the_built_model():
    with pytest.raises(ConfigError, match=r"^max_length: 16 leaves no room for text after the 16 tokens of one image"):
        zoo.build(tiny_config(max_length=16))
    config = zoo.get_config("llava-1.5-7b-tiny")
    config.vision.image_size = 8  # under CLIP's 14-pixel patch
    with pytest.raises(ConfigError, match=r"^vision\.image_size: 8 px gives the hf expert no token \(its grid is "
                                          r"0x0\); use a larger image size"):
        zoo.build(config)

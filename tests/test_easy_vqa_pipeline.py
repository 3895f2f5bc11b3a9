"""The easy-vqa pipeline of `make demo` (configs/recipes/easy-vqa.yaml) at a short schedule: captions derived from the
train answers, stage 0's multi-positive contrastive losses against hand computation and open_clip's own losses, the
stage-0 checkpoint read by open_clip itself and by the zoo with identical features, probes, what each stage trains,
the feature cache, and the demo's save / `zoo.load` round trip."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from PIL import Image

import zoo
from zoo.config import ConfigError, configs_dir
from zoo.eval.easy_vqa import EasyVQA
from zoo.train.captions import caption_images
from zoo.train.contrastive import MultiPositiveClipLoss, MultiPositiveSigLipLoss
from zoo.train.data import SkipCounter, VQASample, VQASplit
from zoo.train.recipe import load_recipe, run_recipe

RECIPE = configs_dir() / "recipes" / "easy-vqa.yaml"
# the demo recipe at test size: every stage runs, on a few hundred images
SHORT = ["data.captions.limit=800", "data.questions.limit=2500", "stages.0.contrastive.hold_out=200",
         "stages.0.train.steps=150", "stages.0.train.batch_size=64", "stages.0.train.lr=2e-3", "stages.1.train.steps=8",
         "stages.2.train.steps=12", "stages.3.train.steps=8"]


# ------------------------------------------------------------------------------------------------ captions
def test_captions_come_from_what_the_answers_reveal():
    q = [  # image 0: answered directly; 1: named by questions; 2: by yes/no answers and elimination; 3, 4: not enough
        (0, "what shape is in the image?", "circle"), (0, "what color is the shape?", "red"),
        (1, "what color is the triangle?", "teal"),
        (2, "is there not a blue shape?", "no"), (2, "is there a circle?", "no"), (2, "is no rectangle present?", "yes"),
        (3, "is there a red shape?", "no"), (3, "what shape is present?", "rectangle"),
        (4, "what shape is present?", "circle"), (4, "does the image contain a triangle?", "yes"),
    ]
    split = VQASplit(images=[None] * 5, samples=[VQASample(i, qq, a, f"q{n}") for n, (i, qq, a) in enumerate(q)])
    skipped = SkipCounter()
    captioned = caption_images(split, "train", skipped)
    assert [(c.image, c.caption) for c in captioned] == [(0, "a red circle"), (1, "a teal triangle"),
                                                          (2, "a blue triangle")]
    assert skipped.by_reason == {"caption: its questions do not reveal its colour": ["easy-vqa/train/image-3"],
                                 "caption: its questions' answers contradict each other": ["easy-vqa/train/image-4"]}


def test_train_split_captions(easy_vqa):
    skipped = SkipCounter()
    captioned = caption_images(easy_vqa["train"], "train", skipped)
    assert len(captioned) + skipped.total == 4000
    assert len(captioned) > 3500 and len({c.caption for c in captioned}) == 24  # 8 colours x 3 shapes
    # every caption agrees with every answer about its image
    by_image = {c.image: c for c in captioned}
    for s in easy_vqa["train"].samples:
        if s.image in by_image and s.answer in ("circle", "rectangle", "triangle"):
            assert by_image[s.image].shape == s.answer


def test_a_limited_split_reads_only_its_images_and_equals_the_head_of_the_whole(easy_vqa, monkeypatch):
    import zoo.train.data as data

    opened = []
    monkeypatch.setattr(data, "open_image", lambda path: opened.append(path) or Image.open(path).convert("RGB"))
    head = data.load_easy_vqa("train", limit=50)
    whole = easy_vqa["train"]
    assert [(s.id, s.question, s.answer) for s in head.samples] == [(s.id, s.question, s.answer)
                                                                     for s in whole.samples[:50]]
    needed = sorted({s.image for s in whole.samples[:50]})
    assert len(opened) == len(head.images) == len(needed) < 20  # not the 4,000 images of the split
    for s, w in zip(head.samples, whole.samples[:50]):
        assert head.images[s.image].tobytes() == whole.images[w.image].tobytes()
    assert [s.id for s in EasyVQA().load(30)] == [f"easy-vqa/test/{n}" for n in range(30)]
    with pytest.raises(ConfigError, match="limit: must be >= 1"):
        data.load_easy_vqa("train", limit=0)


# ------------------------------------------------------------------------------------------------ losses
def _features(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_multi_positive_clip_loss_by_hand_and_equal_to_open_clip_without_repeats():
    images, texts, scale = _features(4, 0), _features(3, 1), torch.tensor(7.0, dtype=torch.float64)
    caption = torch.tensor([0, 1, 0, 2])  # images 0 and 2 share caption 0
    logits = (scale * images @ texts.T).tolist()
    image_terms = [-math.log(math.exp(row[c]) / sum(math.exp(v) for v in row)) for row, c in zip(logits, caption)]
    text_terms = []
    for u in range(3):
        column = [logits[i][u] for i in range(4)]
        z = sum(math.exp(v) for v in column)
        owners = [i for i in range(4) if caption[i] == u]  # each of them with target weight 1/len(owners)
        text_terms.append(-sum(math.log(math.exp(column[i]) / z) for i in owners) / len(owners))
    expected = (sum(image_terms) / 4 + sum(text_terms) / 3) / 2
    got = MultiPositiveClipLoss()(images, texts, scale, caption)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # distinct captions: exactly open_clip's ClipLoss
    distinct = _features(4, 2)
    assert torch.allclose(MultiPositiveClipLoss()(images, distinct, scale, torch.arange(4)),
                          ClipLoss()(images, distinct, scale), rtol=0, atol=1e-12)


def test_multi_positive_siglip_loss_by_hand_and_equal_to_open_clip_without_repeats():
    images, texts = _features(4, 3), _features(3, 4)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    caption = torch.tensor([2, 2, 0, 1])
    logits = (scale * images @ texts.T + bias).tolist()
    expected = sum(-math.log(1 / (1 + math.exp(-(1 if caption[i] == u else -1) * logits[i][u])))
                   for i in range(4) for u in range(3)) / 4
    assert MultiPositiveSigLipLoss()(images, texts, scale, caption, logit_bias=bias).item() == pytest.approx(
        expected, rel=1e-12)
    distinct = _features(4, 5)
    assert torch.allclose(MultiPositiveSigLipLoss()(images, distinct, scale, torch.arange(4), logit_bias=bias),
                          SigLipLoss()(images, distinct, scale, bias), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the recipe
class TrainableRecorder(L.Callback):
    """Names of the parameters that require grad when each stage starts, and those of the model it trains."""

    def __init__(self):
        self.stages: list[tuple[str, set[str], set[str]]] = []

    def on_train_start(self, trainer, module) -> None:
        model = getattr(module, "model", None) or module.clip
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.stages.append((type(module).__name__, trainable, {n for n, _ in model.named_parameters()}))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("easy-vqa") / "run"
    recorder = TrainableRecorder()
    torch.manual_seed(0)
    model = run_recipe(load_recipe(RECIPE, SHORT), run_dir, progress=False, callbacks=[recorder])
    return {"dir": run_dir, "model": model, "recorder": recorder,
            "info": json.loads((run_dir / "run.json").read_text())}


def test_stage_boundaries_train_exactly_what_the_recipe_says(short_run):
    stages = short_run["recorder"].stages
    assert [kind for kind, _, _ in stages] == ["ContrastiveModule"] + ["ZooLightningModule"] * 3
    _, clip_trainable, clip_all = stages[0]
    assert clip_trainable == clip_all and any(n.startswith("visual.") for n in clip_trainable)  # image + text towers
    _, align, names = stages[1]
    assert align == {n for n in names if n.startswith("connector.")}
    _, instruct, names = stages[2]
    assert instruct == {n for n in names if n.startswith(("connector.", "lm."))}
    _, moe, names = stages[3]
    assert moe == {n for n in names if n.startswith("lm.") and ".mlp." in n}
    assert any(n.endswith("router.weight") for n in moe) and not any("vision" in n for n in align | instruct | moe)
    # the exports agree: what a stage froze is bitwise what the stage before exported
    exports = {p.name: zoo.load(p / "model").state_dict() for p in sorted(short_run["dir"].glob("0[0-3]-*"))}
    for before, after, moved in (("00-vision", "01-align", ("connector.",)),
                                 ("01-align", "02-instruct", ("connector.", "lm.")),
                                 ("02-instruct", "03-moe", ("lm.",))):
        old, new = exports[before], exports[after]
        for name, tensor in old.items():
            if name in new and not name.startswith(moved):
                assert torch.equal(tensor, new[name]), f"{before} -> {after}: {name} changed"
        assert any(not torch.equal(t, new[n]) for n, t in old.items() if n in new and n.startswith(moved))
    attention = [n for n in exports["03-moe"] if ".self_attn." in n]
    assert attention and all(torch.equal(exports["02-instruct"][n], exports["03-moe"][n]) for n in attention)


def test_stage_zero_checkpoint_loads_in_open_clip_and_in_the_zoo_with_identical_features(short_run, easy_vqa):
    directory = short_run["dir"] / "00-vision" / "open_clip"
    model = zoo.load(short_run["dir"] / "00-vision" / "model")
    assert model.config.vision.kind == "open_clip" and model.config.vision.frozen
    pixels = model.vision.preprocess(easy_vqa["test"].images[:6])
    torch.save(pixels, short_run["dir"] / "pixels.pt")  # our own tensor, for the subprocess below
    with torch.no_grad():
        ours = model.vision(pixels)
    # open_clip itself, in a process that never imports zoo: the last trunk stage the zoo reads, as [N, h*w, C]
    script = (
        "import sys, torch, open_clip\n"
        f"m = open_clip.create_model('local-dir:{directory}').eval()\n"
        f"x = torch.load('{short_run['dir'] / 'pixels.pt'}', weights_only=True)\n"
        "with torch.no_grad():\n"
        "    f = m.visual.trunk.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]\n"
        f"torch.save(f.flatten(2).transpose(1, 2).contiguous(), '{short_run['dir'] / 'theirs.pt'}')\n"
        "assert 'zoo' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    theirs = torch.load(short_run["dir"] / "theirs.pt", weights_only=True)
    assert ours.shape == (6, 4, 256) and torch.equal(ours, theirs)


def test_probe_after_stage_zero_beats_the_random_tower(short_run):
    report = short_run["info"]["stages"]["vision"]["contrastive"]
    assert report["held_out"] == 200 and report["captions"] == 24
    assert report["probe"]["shape"] > report["probe_random_tower"]["shape"] + 0.05
    assert report["probe"]["shape"] > 0.55  # 150 steps on 600 images; the full stage 0 reaches ~98%
    loss = short_run["info"]["stages"]["vision"]
    assert loss["loss_last_fifth"] < loss["loss_first_fifth"]


def test_later_stages_read_the_feature_cache(short_run):
    stages = short_run["info"]["stages"]
    assert [stages[n]["feature_cache"] for n in ("align", "instruct", "moe")] == [True, True, True]
    index = next((short_run["dir"] / "features").glob("*/index.json"))
    assert len(json.loads(index.read_text())["entries"]) >= 800  # every captioned image, encoded once


def test_cached_features_train_like_live_ones(tmp_path):
    """Two instruct stages from the same start, one reading the cache, one running the frozen tower: equal losses."""
    overrides = ["data.questions.limit=300", "data.captions.limit=64",
                 "stages=[{name: vision, objective: contrastive, contrastive: {hold_out: 0}, data: {captions: 1.0}, "
                 "trainable: [vision], train: {steps: 2, batch_size: 16}}, {name: instruct, data: {questions: 1.0}, "
                 "template: zoo, trainable: [connector, lm], train: {steps: 6, batch_size: 16}}]"]
    losses = []
    for cache in (True, False):
        torch.manual_seed(0)
        run_recipe(load_recipe(RECIPE, [*overrides, f"feature_cache={str(cache).lower()}"]), tmp_path / str(cache),
                   progress=False)
        info = json.loads((tmp_path / str(cache) / "run.json").read_text())["stages"]["instruct"]
        assert info["feature_cache"] is cache
        losses.append((info["loss_first_fifth"], info["loss_last_fifth"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-6)


def test_contrastive_stage_needs_an_open_clip_tower_and_trains_only_vision(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.trainable: a contrastive stage trains the vision tower"):
        load_recipe(RECIPE, ["stages.0.trainable=[connector]"])
    recipe = load_recipe(RECIPE, ["model=tiny-llava", "stages.0.train.steps=1", "data.captions.limit=32"])
    with pytest.raises(ConfigError, match=r"vision\.kind: a contrastive stage pretrains an open_clip tower"):
        run_recipe(recipe, tmp_path / "run", progress=False)


# ------------------------------------------------------------------------------------------------ the demo
def test_demo_runs_the_recipe_evaluates_both_models_and_reloads(short_run, capsys):
    """`zoo demo` on the short run's directory: --resume loads every finished stage (the contrastive one rebuilds its
    open_clip expert first), then the demo evaluates, reports and round-trips the model."""
    from zoo.cli import main

    out = short_run["dir"]
    exports = {p: p.stat().st_mtime_ns for p in out.glob("0*/model/model.safetensors")}
    assert main(["demo", "--out", str(out), "--limit", "200", "--no-progress", "--resume",
                 *[a for o in SHORT for a in ("--set", o)]]) == 0
    assert {p: p.stat().st_mtime_ns for p in exports} == exports  # nothing retrained
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"instruct", "moe"}
    for table in results["accuracy"].values():
        assert set(table) == {"overall", "colour", "shape", "yes/no", "majority baseline"}
    assert "dense (after stage 2, instruct):" in printed and "sparse (after stage 3, MoE-tune):" in printed
    assert "| overall | 200 |" in printed and "identical before and after reload" in printed
    assert "linear probe" in printed and "shape:" in printed
    assert set(results["seconds"]) >= {"stage vision", "stage align", "stage instruct", "stage moe", "save + reload"}
    # dropless top-2 routing in eval sends each of the 4 image tokens of the 512 samples to two experts
    (layer,) = results["expert_load"].values()
    assert sum(layer["image"]) == 512 * 4 * 2
    reloaded = zoo.load(out / "model")
    assert reloaded.config.name == "tiny-clip-llava" and reloaded.config.lm.sparsity.preset == "moe-llava"
    images = [s.load_image() for s in EasyVQA(split="test").load(8)]
    questions = [s.question for s in EasyVQA(split="test").load(8)]
    assert reloaded.answer(images, questions) == short_run["model"].answer(images, questions)
    assert Path(reloaded.config.vision.name.removeprefix("local-dir:")) == (out / "00-vision" / "open_clip").resolve()
    # `zoo eval` on the saved model reproduces the sparse accuracy the demo printed, row by row
    assert main(["eval", str(out / "model"), "--benchmark", "easy-vqa", "--limit", "200", "--out", str(out / "eval"),
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    scores = json.loads((out / "eval" / "results.json").read_text())["benchmarks"]["easy-vqa"]["scores"]
    printed_rows = dict(re.findall(r"^\| ([a-z/ ]+) \| 200 \| ([\d.]+)%", printed.split("\nsparse (after stage 3, MoE-tune):\n")[1], re.M))
    assert f"| easy-vqa | test | 200 | accuracy | {printed_rows['overall']} |" in table
    for row, value in results["accuracy"]["moe"].items():
        assert scores["accuracy" if row == "overall" else row] == pytest.approx(100 * value, abs=1e-9)

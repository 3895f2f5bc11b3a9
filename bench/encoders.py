"""Benchmark: align-stage training steps with and without the frozen-feature cache, and the cost of fusing experts.

Run from the repository root::

    .venv/bin/python bench/encoders.py                 # 10 timed steps after 2 warmup steps, batch 32
    .venv/bin/python bench/encoders.py --steps 20 --batch 64 --threads 2

Setup (all random weights, built from configs; easy-vqa images at 64 px, resized by each expert):

- vision: a two-expert tower, CLIP-style (transformers CLIP, width 256, 6 layers, 112 px, patch 14: 8x8 tokens)
  + DINOv2-style (timm ViT with 4 registers, width 256, 6 layers, 112 px), frozen, channel-fused on the 8x8 grid;
  and a four-expert tower (MoCHA's families: those two + SigLIP-style + ConvNeXt-style, each 8x8 tokens);
- connector: ``mlp2x_gelu`` (trainable); LM: Llama, width 256, 4 layers (frozen, as in LLaVA's align stage:
  gradients still flow through it to the connector).

``align step``: forward + backward + AdamW step on the same batches of 32 questions (distinct images), either
``live`` (pixels through the frozen experts every step) or ``cached`` (features read from a `FeatureCache` written
once before timing; its build time is reported on its own). The losses of the two are compared first (they must be
equal: the cache holds bitwise the live features). ``fusion``: one forward of the tower alone per image batch, for
each expert alone and fused by channel and by sequence concatenation.

Columns: median ms over the timed steps, taken round-robin. Target: cached align steps >= 2x faster than live. The
speed-up is bounded by the share of the step the frozen experts take: what remains with the cache is the connector
and the frozen LM's forward and backward (to the connector), so it grows with the number and size of the experts.
Results depend on the machine, threads and torch build.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import zoo
from zoo.config import FusionConfig, VisionConfig, from_dict
from zoo.encoders import FeatureCache, FusedVision
from zoo.train import VQATrainingSet, load_easy_vqa
from zoo.train.data import VQASample, VQASplit

CLIP = {"kind": "hf", "frozen": True, "kwargs": {
    "model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
    "num_attention_heads": 4, "image_size": 112, "patch_size": 14}}
DINO = {"kind": "timm", "name": "vit_large_patch14_reg4_dinov2", "image_size": 112, "frozen": True,
        "kwargs": {"embed_dim": 256, "depth": 6, "num_heads": 4}}
SIGLIP = {"kind": "hf", "frozen": True, "kwargs": {
    "model_type": "siglip_vision_model", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
    "num_attention_heads": 4, "image_size": 112, "patch_size": 14}}
CONVNEXT = {"kind": "timm", "name": "convnext_atto", "image_size": 128, "frozen": True, "feature_layer": 2,
            "kwargs": {"depths": [2, 2, 6, 2], "dims": [64, 128, 256, 256]}}  # stride-16 stage: 8x8
SETUPS = {"two-expert": [CLIP, DINO], "four-expert": [CLIP, SIGLIP, DINO, CONVNEXT]}


def build_model(setup: str = "two-expert") -> zoo.ZooModel:
    """``two-expert``: the fused CLIP + DINOv2 setup of the module docstring; ``four-expert``: CLIP + SigLIP +
    DINOv2 + ConvNeXt (MoCHA's four families, each 8x8 tokens), channel-fused, same LM; ``demo``: tiny-llava (the
    demo model: ConvNeXt-atto front end, Llama 128 x 2 layers) with its vision frozen."""
    config = zoo.get_config("tiny-llava")
    config.name = "bench-encoders"
    if setup == "demo":
        config.vision.frozen = True
    else:
        config.vision = [from_dict(VisionConfig, dict(e), path=f"vision[{i}]") for i, e in enumerate(SETUPS[setup])]
        config.fusion = FusionConfig(mode="channel")
        config.lm.config = {**config.lm.config, "hidden_size": 256, "intermediate_size": 1024,
                            "num_hidden_layers": 4}
    torch.manual_seed(0)
    model = zoo.build(config)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("connector."))
    return model


def time_round_robin(runs: dict, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each function, calls interleaved across the candidates."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn(i)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--setup", choices=["two-expert", "four-expert", "demo", "all"], default="all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    full = load_easy_vqa("train")
    # the first 8 batches' worth of images, one question each: every step encodes `batch` distinct images
    first: dict[int, VQASample] = {}
    for s in full.samples:
        if s.image < args.batch * 8:
            first.setdefault(s.image, s)
    split = VQASplit(full.images[: args.batch * 8], [first[i] for i in sorted(first)])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}; {args.steps} timed "
          f"steps after 2 warmup steps")
    for setup in (["two-expert", "four-expert", "demo"] if args.setup == "all" else [args.setup]):
        run(setup, split, args)


def run(setup: str, split: VQASplit, args: argparse.Namespace) -> None:
    """Time one setup and print its tables."""
    model = build_model(setup)
    live = VQATrainingSet(model, split)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cache = FeatureCache(root, model.vision)
        cached = VQATrainingSet(model, split, features=cache)
        build_s = time.perf_counter() - start
        batches = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(8)]  # item j asks about image j
        live_batches = [live.collate([live[j] for j in b]) for b in batches]
        cached_batches = [cached.collate([cached[j] for j in b]) for b in batches]
        with torch.no_grad():
            a, b = model(**live_batches[0]).loss, model(**cached_batches[0]).loss
        assert torch.equal(a, b), f"cached loss {b.item()} != live loss {a.item()}"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(batch):
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()

        model.train()
        align = time_round_robin({"live": lambda i: step(live_batches[i % 8]),
                                  "cached": lambda i: step(cached_batches[i % 8])}, args.steps)

    print(f"\n## {setup}: feature cache built in {build_s:.1f} s for {len(split.images)} images ({len(cache)} cached)")
    ratio = align["live"] / align["cached"]
    print("\n| align step | ms | speed-up |\n|---|---:|---:|")
    print(f"| live (frozen experts run) | {align['live']:.1f} | 1.00x |")
    print(f"| cached features | {align['cached']:.1f} | {ratio:.2f}x {'PASS' if ratio >= 2 else 'MISS'} (>= 2x) |")
    if setup != "two-expert":
        return
    model.eval()
    pixels = model.vision.preprocess([split.images[i] for i in range(args.batch)])
    seq = FusedVision(model.config.vision, FusionConfig(mode="sequence"))
    seq.load_state_dict(model.vision.state_dict())
    with torch.no_grad():
        fusion = time_round_robin({
            "CLIP alone": lambda i: model.vision.experts[0](pixels["0"]),
            "DINOv2 alone": lambda i: model.vision.experts[1](pixels["1"]),
            "fused (channel, 8x8)": lambda i: model.vision(pixels),
            "fused (sequence)": lambda i: seq(pixels),
        }, args.steps)
    base = fusion["CLIP alone"] + fusion["DINOv2 alone"]
    print("\n| vision forward | ms | vs the two experts alone |\n|---|---:|---:|")
    for name, ms in fusion.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()

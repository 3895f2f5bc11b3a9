"""Benchmark: the zoo training step against a plain PyTorch loop over transformers' LlavaForConditionalGeneration,
and the data pipeline's throughput against what training consumes.

Run from the repository root::

    .venv/bin/python bench/train.py                         # llava-1.5-7b-tiny widened to --hidden 256
    .venv/bin/python bench/train.py --hidden 512 --layers 4 --steps 30 --threads 2

Setup: the catalogue's ``llava-1.5-7b-tiny`` layout (transformers CLIP tower, frozen; mlp2x_gelu; Llama LM) with
the LM widened to ``--hidden`` / ``--layers``, random weights, instruction stage (connector + LM train). Batches:
easy-vqa conversations through `ConversationStream` (``zoo`` template), collated once and reused by both sides.

- ``zoo``: `zoo.train.fit` on those batches: the real Lightning Trainer with `ZooLightningModule` (AdamW with
  per-part groups, warm-up + cosine schedule, grad clipping 1.0, logging), one optimizer step per batch;
- ``plain``: `zoo.convert.to_transformers` of the same weights, a hand-written loop (forward with labels,
  backward, clip 1.0, AdamW step, zero_grad) on the same batches with each image placeholder expanded to the image
  tokens, as llava-hf expects.

Before timing, the first-step losses of both sides are compared (they must agree to 1e-4). Columns: median ms per
optimizer step over the timed steps (after 3 warm-up steps), best of ``--rounds`` rounds taken alternately; target
``zoo / plain <= 1.10``. Pipeline: samples per second that `ConversationStream` + collate produce in the main
process (tokenise, decode and preprocess images) against the samples per second ``zoo`` trains on; target
``>= 5x``. Results depend on the machine, threads and load.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch
from torch.utils.data import IterableDataset

import zoo
import zoo.convert
from zoo.config import ModelConfig
from zoo.model import IGNORE_INDEX
from zoo.train import TrainConfig, fit, load_easy_vqa
from zoo.train.conversations import Conversation, ConversationStream


def build_model(hidden: int, layers: int) -> zoo.ZooModel:
    config = zoo.get_config("llava-1.5-7b-tiny").to_dict()
    config["lm"]["config"].update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    torch.manual_seed(0)
    model = zoo.build(ModelConfig.from_dict(config))
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("vision."))
    return model


def easy_vqa_stream(model: zoo.ZooModel, n: int) -> ConversationStream:
    split = load_easy_vqa("train")
    samples = [Conversation(s.id, [("user", s.question), ("assistant", s.answer)], [split.images[s.image]])
               for s in split.samples[:n]]
    return ConversationStream(model, [samples], template="zoo")


class Batches(IterableDataset):
    """Pre-collated batches, cycled: both sides train on exactly the same tensors."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches

    @staticmethod
    def collate(items):
        return items[0]


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def expand_for_llava(batch: dict, image_id: int, tokens: int) -> dict:
    """One placeholder per image -> ``tokens`` placeholders (labels -100 there), right-padded again."""
    rows, labels = [], []
    for ids, mask, labs in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        ids, labs = ids[mask.bool()].tolist(), labs[mask.bool()].tolist()
        rows.append([t for tok in ids for t in ([tok] * tokens if tok == image_id else [tok])])
        labels.append([v for tok, v in zip(ids, labs) for v in ([IGNORE_INDEX] * tokens if tok == image_id else [v])])
    width = max(len(r) for r in rows)
    out_ids = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask = torch.zeros_like(out_ids)
    out_labels = torch.full_like(out_ids, IGNORE_INDEX)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        out_ids[i, : len(r)], out_mask[i, : len(r)], out_labels[i, : len(r)] = torch.tensor(r), 1, torch.tensor(lab)
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels,
            "pixel_values": batch["pixel_values"]}


def time_zoo(model, batches, steps: int) -> tuple[list[float], float]:
    timer = StepTimer()
    config = TrainConfig(steps=steps, batch_size=1, lr=1e-4, warmup_ratio=0.0, log_every=10)
    module = fit(model, Batches(batches), config, progress=False, callbacks=[timer])
    return timer.times, float(module.losses[0])


def time_plain(llava, batches, steps: int) -> tuple[list[float], float]:
    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    llava.train()
    times, first = [], None
    for step in range(steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss = llava(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        first = float(loss.detach()) if first is None else first
    return times, first


def pipeline_rate(stream: ConversationStream, batch_size: int, samples: int) -> float:
    start, items, batch = time.perf_counter(), 0, []
    for item in stream:
        batch.append(item)
        if len(batch) == batch_size:
            stream.collate(batch)
            items, batch = items + batch_size, []
            if items >= samples:
                break
    return items / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round (+3 warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.hidden, args.layers)
    stream = easy_vqa_stream(model, 4000)
    items = []
    for item in stream:
        items.append(item)
        if len(items) == args.batch * 8:
            break
    batches = [stream.collate(items[i:i + args.batch]) for i in range(0, len(items), args.batch)]
    llava_batches = [expand_for_llava(b, model.image_token_id, model.num_image_tokens) for b in batches]
    start_state = copy.deepcopy(model.state_dict())
    llava = zoo.convert.to_transformers(model)
    llava_state = copy.deepcopy(llava.state_dict())
    for p_name, param in llava.named_parameters():
        param.requires_grad_(not p_name.startswith("model.vision_tower."))

    n = args.steps + 3
    zoo_best = plain_best = float("inf")
    for round_ in range(args.rounds):
        model.load_state_dict(start_state)
        zoo_times, zoo_loss = time_zoo(model, batches, n)
        llava.load_state_dict(llava_state)
        plain_times, plain_loss = time_plain(llava, llava_batches, n)
        if round_ == 0:
            print(f"first-step loss: zoo {zoo_loss:.6f}, plain {plain_loss:.6f}")
            if abs(zoo_loss - plain_loss) > 1e-4:
                raise SystemExit("the two sides do not compute the same loss")
        zoo_best = min(zoo_best, statistics.median(zoo_times[3:]))
        plain_best = min(plain_best, statistics.median(plain_times[3:]))
    ratio = zoo_best / plain_best
    consumed = args.batch / zoo_best
    produced = pipeline_rate(easy_vqa_stream(model, 4000), args.batch, args.batch * 12)
    print(f"model: llava-1.5-7b-tiny layout, LM hidden {args.hidden} x {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; batch {args.batch}; "
          f"threads {torch.get_num_threads()}")
    print("| what | ms / step | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| plain loop (LlavaForConditionalGeneration) | {1e3 * plain_best:.1f} | 1.00 | |")
    print(f"| zoo (fit: Lightning + ZooLightningModule) | {1e3 * zoo_best:.1f} | {ratio:.2f} | <= 1.10 "
          f"{'PASS' if ratio <= 1.10 else 'MISS'} |")
    print(f"pipeline: {produced:.0f} samples/s produced vs {consumed:.0f} samples/s consumed = "
          f"{produced / consumed:.1f}x (target >= 5x {'PASS' if produced / consumed >= 5 else 'MISS'})")


if __name__ == "__main__":
    main()

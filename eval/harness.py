"""The evaluation harness: batched greedy generation over a benchmark, resumable predictions, scores, results.

Scores move with batch size, padding and answer extraction when a harness is careless; this one decodes greedily
with a fixed batch size and left padding (``ZooModel.answer``, whose answers do not depend on the batch size),
streams every prediction to JSON lines as its batch ends (an interrupted run resumes where it stopped), and
records every setting that changes a score next to the scores.

Layout of ``out_dir``::

    results.json              model, settings, package versions, time, and per benchmark its scores
    results.md                the Markdown table across benchmarks
    <benchmark>/settings.json what the predictions were made with (a resume must match it)
    <benchmark>/predictions.jsonl   {"question_id", "prompt", "text", "parsed", "model_id"} per question
    <benchmark>/predictions.rank<r>.jsonl   the stream of rank r while a run is under way

Distributed: under ``torch.distributed`` each rank answers ``samples[rank::world_size]`` and the predictions are
gathered (``all_gather_object``) before scoring, so every rank holds the full scores; rank 0 writes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import writing

from .benchmark import BENCHMARKS, Benchmark, BenchmarkDataError, Sample

PADDING_SIDE = "left"  # what ZooModel.answer pads prompts with for generation
PACKAGES = ("torch", "transformers", "tokenizers", "timm", "open_clip_torch", "torchmetrics", "lightning", "pillow",
            "numpy", "easy-vqa")


@dataclass
class BenchmarkRun:
    """One benchmark's evaluation: its samples, the model's outputs in sample order, the scores and the entry
    written to ``results.json``."""

    benchmark: Benchmark
    samples: list[Sample]
    outputs: list[str]
    scores: dict[str, float]
    record: dict[str, Any]


# -------------------------------------------------------------------- distribution
def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items rank ``rank`` of ``world_size`` answers: every ``world_size``-th from ``rank`` (disjoint, covering,
    sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in a world of size {world_size}")
    return list(items[rank::world_size])


def gather(local: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Every rank's ``{question_id: record}`` merged on every rank (the identity in a single process)."""
    if world_size == 1:
        return dict(local)
    parts: list[dict[str, Any] | None] = [None] * world_size
    torch.distributed.all_gather_object(parts, local)
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged


# -------------------------------------------------------------------- provenance
def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that change outputs or scores (and Python's)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes): the identity of the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def model_info(model, source: str | None = None) -> dict[str, Any]:
    """What identifies the evaluated model: config name, weights hash, parameter count, prompt template, device."""
    param = next(model.parameters())
    return {"name": model.config.name, "source": source, "weights_sha256": weights_sha256(model),
            "parameters": sum(p.numel() for p in model.parameters()), "prompt_template": model.config.prompt,
            "device": param.device.type, "dtype": str(param.dtype).removeprefix("torch.")}


# -------------------------------------------------------------------- predictions on disk
class PredictionStore:
    """The predictions of one benchmark under ``directory``: read back on resume, streamed per rank, merged."""

    def __init__(self, directory: Path, rank: int):
        self.directory = directory
        self.stream = directory / f"predictions.rank{rank}.jsonl"
        self.merged = directory / "predictions.jsonl"

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("predictions*.jsonl"))

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Predictions already in the folder must have been made with ``settings``; record them otherwise."""
        path = self.directory / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if differ:
                raise RuntimeError(f"{self.directory}: the predictions there were made with other settings "
                                   f"({', '.join(differ)} differ); use another output directory or delete it")
            return
        if self.files():
            raise RuntimeError(f"{self.directory}: predictions without a settings.json; delete them or use another "
                               "output directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def completed(self) -> dict[str, dict]:
        """Every complete prediction line in the folder; a last line cut short by a crash is dropped (and cut from
        this rank's own stream, which is appended to next)."""
        done: dict[str, dict] = {}
        for path in self.files():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if path == self.stream and len(complete) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise BenchmarkDataError(f"{path}: line {number} is not valid JSON ({error.msg}); the "
                                             "predictions file is damaged") from error
                done[record["question_id"]] = record
        return done

    def append(self, records: Sequence[dict]) -> None:
        """Append one batch's records and force them to disk (a kill loses at most the batch in flight)."""
        with writing(self.stream), open(self.stream, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def merge(self, records: Sequence[dict]) -> None:
        """Write all records in sample order to ``predictions.jsonl`` and drop the rank streams."""
        _write_atomic(self.merged, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        for path in self.directory.glob("predictions.rank*.jsonl"):
            path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path, cleanup=tmp):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


# -------------------------------------------------------------------- generation
def _answer_batches(model, benchmark: Benchmark, samples: Sequence[Sample], batch_size: int, max_new_tokens: int,
                    progress: bool):
    """Yields the prediction records of each batch of ``samples`` (greedy, left-padded, ``batch_size`` at a time)."""
    starts = range(0, len(samples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=benchmark.name, unit="batch")
    for start in starts:
        batch = samples[start:start + batch_size]
        prompts = [benchmark.prompt(s) for s in batch]
        texts = model.answer([s.load_image() for s in batch], prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
        yield [{"question_id": s.id, "prompt": p, "text": t, "parsed": benchmark.parse(t, s),
                "model_id": model.config.name} for s, p, t in zip(batch, prompts, texts)]


def evaluate_benchmark(model, benchmark: Benchmark, out_dir: str | Path | None = None, batch_size: int = 16,
                       limit: int | None = None, max_new_tokens: int | None = None, progress: bool = False,
                       model_meta: dict[str, Any] | None = None, samples: list[Sample] | None = None) -> BenchmarkRun:
    """Answer, gather and score one benchmark.

    With ``out_dir``, predictions stream to ``out_dir/<benchmark>/`` and a second call picks up the questions the
    first did not finish (the settings must match); without it, nothing is written. ``max_new_tokens`` overrides
    the benchmark's own; ``samples`` (already loaded, e.g. a held-out split read once) replaces
    ``benchmark.load(limit)``. Under ``torch.distributed`` each rank answers its shard; every rank gets the scores.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    rank, world_size = distributed_context()
    started = time.perf_counter()
    samples = benchmark.load(limit) if samples is None else samples
    if not samples:
        raise BenchmarkDataError(f"{benchmark.name}: no samples to evaluate in {benchmark.root}")
    new_tokens = max_new_tokens or benchmark.max_new_tokens
    settings = {"benchmark": benchmark.describe(), "model": model_meta or {"name": model.config.name},
                "decoding": {"strategy": "greedy", "do_sample": False, "num_beams": 1, "temperature": 0.0,
                             "max_new_tokens": new_tokens},
                "batch_size": batch_size, "padding_side": PADDING_SIDE}
    store = PredictionStore(Path(out_dir) / benchmark.name, rank) if out_dir is not None else None
    done: dict[str, dict] = {}
    if store is not None:
        store.check_settings(settings)
        done = store.completed()
    mine = shard(samples, rank, world_size)
    for sample in mine:
        if sample.id in done and done[sample.id]["prompt"] != benchmark.prompt(sample):
            raise RuntimeError(f"{store.directory}: the stored prediction for {sample.id} was made with another "
                               "prompt; delete the folder or use another output directory")
    todo = [s for s in mine if s.id not in done]
    for records in _answer_batches(model, benchmark, todo, batch_size, new_tokens, progress and rank == 0):
        if store is not None:
            store.append(records)
        done.update({r["question_id"]: r for r in records})
    merged = gather({s.id: done[s.id] for s in mine}, world_size)
    records = [merged[s.id] for s in samples]
    if store is not None and rank == 0:
        store.merge(records)
    outputs = [r["text"] for r in records]
    scores = benchmark.score(samples, outputs)
    seconds = time.perf_counter() - started
    record = {**settings, "questions": benchmark.count_questions(samples), "samples": len(samples), "limit": limit, "world_size": world_size,
              "prompt_example": records[0]["prompt"], "scores": scores, "summary_metrics": list(benchmark.metrics),
              "predictions": f"{benchmark.name}/predictions.jsonl" if store is not None else None,
              "timing": {"seconds": round(seconds, 3), "generated": len(todo),
                         "samples_per_second": round(len(todo) / seconds, 3) if todo else None}}
    return BenchmarkRun(benchmark, samples, outputs, scores, record)


def get_benchmark(name: str, data: str | Path | None = None) -> Benchmark:
    """A registered benchmark reading from the first folder that exists of ``data/<name>``, ``data/<its data
    folder>`` (``textvqa-ocr`` reads ``textvqa``'s files) and ``data`` itself."""
    benchmark = BENCHMARKS.get(name, field="--benchmark")()
    if data is not None:
        candidates = [Path(data) / name, Path(data) / benchmark.folder]
        benchmark.root = next((c for c in candidates if c.is_dir()), Path(data))
    return benchmark


def evaluate(model, benchmarks: str | Sequence[str | Benchmark], data: str | Path | None = None,
             out_dir: str | Path | None = None, batch_size: int = 16, limit: int | None = None,
             max_new_tokens: int | None = None, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (a ZooModel, or a checkpoint dir / hub id / catalogue name for ``zoo.load``) on
    ``benchmarks`` (names, comma-separated names, or Benchmark objects) and return the results.

    ``out_dir`` (default ``runs/eval/<model name>``) receives ``results.json`` and ``results.md`` (merged with the
    benchmarks an earlier call wrote there for the same weights) and the resumable predictions.
    """
    import zoo

    source = None
    if not isinstance(model, torch.nn.Module):
        source = str(model)
        model = zoo.load(model)
    if device is not None:
        model.to(device)
    model.eval()
    if isinstance(benchmarks, str):
        benchmarks = [b.strip() for b in benchmarks.split(",") if b.strip()]
    benches = [b if isinstance(b, Benchmark) else get_benchmark(b, data) for b in benchmarks]
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / "eval" / model.config.name
    rank, world_size = distributed_context()
    info = model_info(model, source)
    results = _previous_results(out_dir / "results.json", info)
    for bench in benches:
        run = evaluate_benchmark(model, bench, out_dir, batch_size=batch_size, limit=limit,
                                 max_new_tokens=max_new_tokens, progress=progress, model_meta=info)
        results["benchmarks"][bench.name] = run.record
    results.update({"model": info, "packages": package_versions(), "zoo": zoo.__version__,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        _write_atomic(out_dir / "results.md", results_table(results) + "\n")
    return results


def _previous_results(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        return {"benchmarks": {}}
    previous = json.loads(path.read_text())
    if previous.get("model", {}).get("weights_sha256") != info["weights_sha256"]:
        raise RuntimeError(f"{path} holds results of other weights ({previous.get('model', {}).get('name')}); "
                           "use another output directory")
    return previous


def results_table(results: dict[str, Any]) -> str:
    """The Markdown table across benchmarks: one row each, its main score and the other summary scores."""
    lines = ["| benchmark | split | questions | metric | score | more |", "|---|---|---:|---|---:|---|"]
    for name, entry in results["benchmarks"].items():
        keys = [k for k in entry["summary_metrics"] if k in entry["scores"]] or list(entry["scores"])[:1]
        more = ", ".join(f"{k} {entry['scores'][k]:.2f}" for k in keys[1:])
        lines.append(f"| {name} | {entry['benchmark']['split']} | {entry['questions']} | {keys[0]} | "
                     f"{entry['scores'][keys[0]]:.2f} | {more} |")
    return "\n".join(lines)


def evaluate_command(model: str, benchmarks: str, device: str | None = None, **options) -> dict[str, Any]:
    """``zoo eval``: :func:`evaluate`, then the table printed by rank 0. Under ``torchrun`` (``WORLD_SIZE`` > 1)
    the process joins the group first (NCCL on GPUs, on ``cuda:<LOCAL_RANK>``; gloo on CPUs) and leaves it after."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized()
    if joined:
        cuda = torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if device is None and cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    rank = distributed_context()[0]
    try:
        results = evaluate(model, benchmarks, device=device, **options)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(results_table(results))
    return results

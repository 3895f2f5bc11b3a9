"""Dynamic batching: one worker thread owns a model and answers the requests that are waiting together in one
`ZooModel.generate` call (up to ``max_batch``), streaming each request's text as its tokens come.

Every use of the model goes through the worker (the sparse layers' routing context is per call, so two threads must
never run the model at once): `Engine.submit` queues a generation, `Engine.call` any other function of the model
(the Experts view's forward pass). A greedy answer does not depend on the batch it ran in: prompts are left-padded
with attention masks, padding never reaches the routers, and each request keeps its own options and seed
(`zoo.generation`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from zoo.encoders import map_pixels
from zoo.generation import TextStream

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished answer: ``finish_reason`` is ``stop`` (EOS or a stop string) or ``length`` (the token budget)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One generation request. ``sink`` receives ``("text", piece)`` events while it runs, then ``("done",
    Completion)`` or ``("error", message)``; it is called from the worker thread."""

    prompt: list[int]
    image: Image.Image
    config: GenerationConfig
    seed: int | None
    budget: int
    prompt_tokens: int
    sink: Callable[[tuple[str, object]], None]
    stream: TextStream
    tokens: int = 0
    finished: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def finish(self, reason: str) -> None:
        piece = self.stream.finish()
        if piece:
            self.sink(("text", piece))
        self.finished = True
        self.sink(("done", Completion(self.stream.text, reason, self.prompt_tokens, self.tokens)))


def spliced_length(model, prompt: list[int]) -> int:
    """How many positions ``prompt`` takes in the LM once each image placeholder became its block of tokens."""
    return len(prompt) + prompt.count(model.image_token_id) * (model.num_image_tokens - 1)


class RowStreamer(BaseStreamer):
    """transformers' streamer interface over a batch of jobs: each step's ``[B]`` tokens go to their jobs' text
    streams; a job finishes at its EOS, its stop string or its budget, without waiting for the rest of the batch."""

    def __init__(self, jobs: list[Job], eos: int):
        self.jobs, self.eos = jobs, eos

    def put(self, value: torch.Tensor) -> None:
        if value.ndim != 1:  # the prompt ids, put first
            return
        for job, token in zip(self.jobs, value.tolist()):
            if job.finished:
                continue
            job.tokens += 1
            if token == self.eos:
                job.finish("stop")
                continue
            piece = job.stream.add(token)
            if piece:
                job.sink(("text", piece))
            if job.stream.stopped:
                job.finish("stop")
            elif job.tokens >= job.budget:
                job.finish("length")

    def end(self) -> None:
        for job in self.jobs:
            if not job.finished:
                job.finish("length")


class Engine:
    """The worker of one model (see the module docstring). ``wait`` seconds: how long the first request of a batch
    waits for others to join it."""

    def __init__(self, model, max_batch: int = 8, wait: float = 0.005, name: str = "model"):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.model = model.eval()
        self.max_batch, self.wait, self.name = max_batch, wait, name
        self.batch_sizes: list[int] = []  # of every generate call, for benchmarks and tests
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"zoo-engine-{name}", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], image: Image.Image, config: GenerationConfig, seed: int | None,
               sink: Callable[[tuple[str, object]], None]) -> Job:
        """Queue a generation for ``prompt`` (ids with one image placeholder) under ``config``, whose
        ``max_new_tokens`` is the request's budget and ``stop_strings`` its stop strings."""
        model = self.model
        if not config.max_new_tokens:
            raise ValueError("config.max_new_tokens: a request needs its token budget")
        job = Job(prompt, image, config, seed, config.max_new_tokens, spliced_length(model, prompt), sink,
                  TextStream(model.tokenizer, config.stop_strings))
        self._queue.put(job)
        return job

    def call(self, fn: Callable) -> Future:
        """Run ``fn(model)`` on the worker, between batches; returns its future."""
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    def close(self) -> None:
        """Stop the worker after the work already queued."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, tuple):
                self._call(*item)
                continue
            jobs = [item]
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if not isinstance(nxt, Job):  # a call or the stop mark: after this batch, in order
                    self._queue.put(nxt)
                    break
                jobs.append(nxt)
            self._run(jobs)

    def _call(self, fn: Callable, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.model))
        except Exception as e:  # handed to the caller
            future.set_exception(e)

    def _run(self, jobs: list[Job]) -> None:
        model = self.model
        self.batch_sizes.append(len(jobs))
        try:
            ids, mask = model.collate_prompts([job.prompt for job in jobs])
            pixels = map_pixels(model.vision.preprocess([job.image for job in jobs]), lambda t: t.to(model.device))
            model.generate(pixels, ids.to(model.device), mask.to(model.device),
                           max_new_tokens=max(job.budget for job in jobs),
                           generation_config=[job.config for job in jobs], seed=[job.seed for job in jobs],
                           streamer=RowStreamer(jobs, model.tokenizer.eos_token_id))
        except Exception as e:  # one bad batch must not stop the server: its requests get the error
            log.exception("generation failed for a batch of %d", len(jobs))
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.sink(("error", f"generation failed: {e}"))

"""What each rank of a distributed run holds and whether it is still alive.

- `MemoryReport`: after the first optimizer step, rank 0 writes ``memory.json`` to the stage directory: the bytes
  of the parameters, gradients and optimizer states each rank really holds (the local shards of sharded tensors).
  `zoo.plan` predicts the same numbers before a run.
- `RankWatch`: every rank bumps a heartbeat counter in a small key-value store hosted by rank 0. When a collective
  fails (a peer died: gloo reports a closed connection at once; a peer hangs: the process-group timeout,
  ``train.timeout``, fires), the rank that caught the error names the ranks whose heartbeat stopped, in a one-line
  error, instead of torch's message about a socket.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the parameters, gradients and optimizer states this rank holds (local shards of DTensors), and the
    number of routed-expert parameter elements among them."""
    from zoo.moe.parallel import expert_banks

    params = list(model.parameters())
    return {
        "parameters": sum(_local(p).numel() * p.element_size() for p in params),
        "gradients": sum(_local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(_local(v).numel() * v.element_size() for state in optimizer.state.values()
                         for v in state.values() if isinstance(v, torch.Tensor)),
        "routed_expert_elements": sum(_local(p).numel() for bank in expert_banks(model).values()
                                      for p in bank.parameters()),
    }


class MemoryReport(L.Callback):
    """Writes ``directory/memory.json`` once, after the first optimizer step (module docstring)."""

    def __init__(self, directory: str | Path):
        self.directory, self.done = Path(directory), False

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.done or trainer.global_step < 1:
            return
        self.done = True
        mine = held_bytes(getattr(module, "model", module), trainer.optimizers[0])  # (ContrastiveModule: its clip)
        ranks = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        if trainer.is_global_zero:
            strategy = trainer.strategy
            report = {"world_size": trainer.world_size, "strategy": type(strategy).__name__,
                      "expert_parallel": getattr(strategy, "expert_parallel", 1), "ranks": ranks}
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "memory.json").write_text(json.dumps(report, indent=1) + "\n")


class RankWatch(L.Callback):
    """Heartbeats of every rank (module docstring). `silent_ranks` names the ranks whose counter stopped;
    ``fit`` turns a failed collective into ``RuntimeError("rank N stopped responding ...")``."""

    def __init__(self, timeout: float, interval: float = 0.5):
        self.timeout, self.interval = timeout, interval
        self.store = None
        self.stopped = threading.Event()

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        if not dist.is_initialized() or dist.get_world_size() == 1 or self.store is not None:
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        host = [None]
        if self.rank == 0:  # others reach it where they reached rank 0's rendezvous (MASTER_ADDR)
            import os
            import socket

            server = dist.TCPStore("0.0.0.0", 0, self.world, is_master=True, wait_for_workers=False,
                                   timeout=_seconds(self.timeout))
            host = [(os.environ.get("MASTER_ADDR") or socket.gethostname(), server.port)]
            self.store = server
        dist.broadcast_object_list(host, src=0)
        if self.rank != 0:
            self.store = dist.TCPStore(host[0][0], host[0][1], self.world, is_master=False,
                                       timeout=_seconds(min(self.timeout, 10.0)))
        threading.Thread(target=self._beat, daemon=True, name="zoo-heartbeat").start()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.store.add(f"heartbeat/{self.rank}", 1)
            except RuntimeError:  # the store's host (rank 0) is gone
                return

    def silent_ranks(self) -> list[int]:
        """Ranks other than this one whose heartbeat did not move for three intervals; ``[0]`` when the store (on
        rank 0) cannot be reached."""
        try:
            before = [self.store.add(f"heartbeat/{r}", 0) for r in range(self.world)]
            time.sleep(3 * self.interval)
            after = [self.store.add(f"heartbeat/{r}", 0) for r in range(self.world)]
        except RuntimeError:
            return [0]
        return [r for r in range(self.world) if r != self.rank and after[r] == before[r]]

    def explain(self, error: BaseException) -> RuntimeError | None:
        """A one-line error naming the silent ranks, or None (single process, or every rank is alive)."""
        if self.store is None or isinstance(error, KeyboardInterrupt):
            return None
        silent = self.silent_ranks()
        if not silent:
            return None
        names = ", ".join(str(r) for r in silent)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return RuntimeError(f"rank {names} stopped responding (no heartbeat for {3 * self.interval:.1f} s); rank "
                            f"{self.rank} stopped too (train.timeout {self.timeout:g} s). The last complete "
                            f"checkpoint is intact; resume with --resume. ({type(error).__name__}: {first})")

    def close(self) -> None:
        self.stopped.set()


def _seconds(value: float):
    from datetime import timedelta

    return timedelta(seconds=value)


__all__ = ["MemoryReport", "RankWatch", "held_bytes"]

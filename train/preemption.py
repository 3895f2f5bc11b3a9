"""Preemption: what a scheduler or a spot instance sends before it takes the machine ends a run cleanly.

`PreemptionGuard` (installed by the recipe runner around its stages) turns SIGTERM and SIGINT into a request to
stop: the step under way finishes, `PreemptionCheckpoint` writes a checkpoint at that step into the stage's
``checkpoints/`` (unless the newest one is already of that step) and the run stops with `Interrupted`, whose message
says where it stopped and how to resume (in a distributed run every rank, at the same step: `PreemptionGuard.agree`); the command exits 143 (SIGTERM) or 130 (SIGINT). A second SIGINT stops at
once (KeyboardInterrupt). Under SLURM (``SLURM_JOB_ID``) the requeue signal SIGUSR1 does the same and then asks
``scontrol requeue`` for the job, which starts again with ``--resume`` in the same run directory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L

from zoo.errors import UserError

log = logging.getLogger(__name__)


class Interrupted(UserError):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    is_error = False  # the command line prints the message as it is (no "error:"), and exits with `exit_code`

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class PreemptionGuard:
    """Signal handlers that record a stop request (main thread only; elsewhere a no-op), restored on exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self.requeue = "SLURM_JOB_ID" in os.environ

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.received = signum

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if self.requeue else [])
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def agree(self) -> int | None:
        """The stop request of this process, or in a distributed run of any rank (one small all-reduce, which every
        rank must call at the same point): signals reach the ranks at slightly different moments, and every rank
        must write its part of the same checkpoint and stop at the same step. A request of another rank becomes this
        one's."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.received or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the signal's number (the largest, if several)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return self.received

    def stop(self, where: str, resume: str) -> None:
        """Raise `Interrupted` if a stop was requested (after requeueing the SLURM job on its signal)."""
        if self.received is None:
            return
        signum = self.received
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1 and self.requeue:
            job = os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            resume = f"requeued SLURM job {job}" if result.returncode == 0 else (
                f"scontrol requeue {job} failed ({result.stderr.strip() or result.returncode}); {resume}")
        raise Interrupted(signum, f"interrupted ({name}) {where}; {resume}")


class PreemptionCheckpoint(L.Callback):
    """Once a stop was requested: a checkpoint of the step reached in ``directory`` (unless the newest is already of
    that step), then `Interrupted`.

    It acts when the next batch starts (or when Lightning stops its loop on SIGTERM, at the same point), as `zoo.train.checkpoint.PeriodicCheckpoint` saves, after Lightning has
    written the finished step's row to ``metrics.csv`` (the resumed run keeps every row). In a distributed run the
    ranks agree first (`PreemptionGuard.agree`, once per step)."""

    def __init__(self, guard: PreemptionGuard, directory: Path, stage: str, resume_command: str):
        self.guard, self.directory, self.stage, self.resume_command = guard, Path(directory), stage, resume_command

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # (between optimizer steps, not inside an accumulation)
            self._checkpoint_and_stop(trainer)

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # Lightning ends the loop itself on SIGTERM (every rank at the same step), after the step's row is logged
        if isinstance(exception, SIGTERMException):
            self._checkpoint_and_stop(trainer)

    def _checkpoint_and_stop(self, trainer: L.Trainer) -> None:
        if self.guard.agree() is None:
            return
        from .checkpoint import latest_checkpoint, save_between_steps

        step = trainer.global_step
        newest = latest_checkpoint(self.directory)
        if step and (newest is None or newest.name != f"step-{step:08d}"):
            save_between_steps(trainer, self.directory / f"step-{step:08d}")
        self.guard.stop(f"at step {step} of stage {self.stage}", f"resume with: {self.resume_command}")


__all__ = ["Interrupted", "PreemptionCheckpoint", "PreemptionGuard"]

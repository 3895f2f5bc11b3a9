"""The models a server holds: each loaded model has its own batching `Engine`, under the name it was asked by.

`model_choices` lists what the web page's picker offers: local checkpoints (``runs/*/model`` and deeper stage
exports ``runs/*/*/model``) and the catalogue names. A local export that has ``checksums.json`` is checked against
it when it loads (a changed file is refused, naming it). A catalogue entry with released weights loads them; one without
is built fresh (untrained) only when it is small (``max_fresh_params``), so a click never builds a 7B model.
"""

from __future__ import annotations

import threading
from pathlib import Path

from zoo.checkpoint import CHECKSUMS_NAME
from zoo.errors import UsageError
from zoo.serve.engine import Engine

DEMO_MODEL = Path("runs/demo/model")


class NoModelError(UsageError):
    """`zoo serve` was given no model and the demo's export does not exist (the command line ends with this message
    and exit status 2)."""


def default_model() -> str | None:
    """The model `zoo serve` shows without a MODEL argument: the demo's export, when it exists."""
    return str(DEMO_MODEL) if (DEMO_MODEL / "config.json").exists() else None


def local_checkpoints(root: str | Path = "runs") -> list[str]:
    """Checkpoint directories under ``root``: ``runs/<run>/model`` and a recipe's ``runs/<run>/<stage>/model``."""
    root = Path(root)
    found = {*root.glob("*/model/config.json"), *root.glob("*/*/model/config.json")}
    return sorted(str(p.parent) for p in found)


def model_choices(root: str | Path = "runs") -> list[str]:
    """The picker's entries: local checkpoints first, then every catalogue name."""
    import zoo

    return local_checkpoints(root) + zoo.list_models()


class ModelPool:
    """Loaded models by name, each with its engine; `get` loads on first use (one load at a time)."""

    def __init__(self, max_batch: int = 8, wait: float = 0.005, device: str | None = None,
                 max_fresh_params: int = 50_000_000):
        self.max_batch, self.wait, self.device, self.max_fresh_params = max_batch, wait, device, max_fresh_params
        self.engines: dict[str, Engine] = {}
        self.untrained: set[str] = set()  # names built fresh from the catalogue (random weights)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The loaded models' names, in load order."""
        return list(self.engines)

    def get(self, name: str) -> Engine:
        """The engine of ``name``, loading the model first if needed (errors name the model)."""
        engine = self.engines.get(name)
        if engine is not None:
            return engine
        with self._lock:
            if name not in self.engines:
                self.engines[name] = Engine(self._load(name), self.max_batch, self.wait, name=name)
            return self.engines[name]

    def _load(self, name: str):
        import zoo
        from zoo.catalogue import get_config

        if Path(name).is_dir():  # a zoo export with checksums.json is checked against it before serving
            return zoo.load(name, device=self.device, verify=(Path(name) / CHECKSUMS_NAME).is_file())
        if name not in zoo.list_models():
            return zoo.load(name, device=self.device)
        if get_config(name).weights:
            return zoo.load(name, device=self.device)
        total = zoo.param_counts(name).total
        if total > self.max_fresh_params:
            raise ValueError(f"{name}: the catalogue entry names no released weights, and at {total:,} parameters "
                             f"it is too large to build untrained here (limit {self.max_fresh_params:,})")
        self.untrained.add(name)
        model = zoo.build(name)
        return model.to(self.device) if self.device else model

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

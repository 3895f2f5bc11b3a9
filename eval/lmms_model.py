"""The registered lmms-eval model ``zoo`` (needs the optional ``lmms_eval`` package; see :mod:`zoo.eval.lmms`)."""

from __future__ import annotations

import torch
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model

from . import lmms as requests_to_zoo
from .harness import distributed_context


@register_model("zoo")
class ZooLMMS(lmms):
    """A zoo model as an lmms-eval model: ``pretrained`` is a checkpoint dir / hub id / catalogue name (or a
    ``ZooModel``); greedy decoding, ``batch_size`` requests at a time, left padding."""

    def __init__(self, pretrained="runs/demo/model", batch_size: int | str = 16, device: str | None = None,
                 max_new_tokens: int = 128, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"zoo lmms-eval model: unknown argument(s) {sorted(kwargs)}")
        import zoo

        self.model = pretrained if isinstance(pretrained, torch.nn.Module) else zoo.load(pretrained)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.batch_size = int(batch_size) if batch_size not in (None, "auto") else 16
        self.max_new_tokens = int(max_new_tokens)
        self._rank, self._world_size = distributed_context()

    def generate_until(self, requests) -> list[str]:
        return requests_to_zoo.generate_until(self.model, [r.args for r in requests], self.task_dict,
                                              batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return requests_to_zoo.loglikelihood(self.model, [r.args for r in requests], self.task_dict)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("zoo models answer single-turn requests (generate_until, loglikelihood)")

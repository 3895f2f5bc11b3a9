"""lmms-eval adapter: zoo models answer lmms-eval's requests (``generate_until``, ``loglikelihood``).

lmms-eval (an optional extra: ``pip install -c constraints.txt -e ".[lmms]"``) hands a model ``Instance`` s whose
``args`` are ``(context, gen_kwargs | target, doc_to_visual, doc_id, task, split)``; the documents live in the
model's ``task_dict[task][split][doc_id]``. This module turns such argument tuples into zoo calls and needs no
lmms-eval; :mod:`zoo.eval.lmms_model` wraps it as the registered lmms-eval model ``zoo`` (found through the
``lmms_eval.models`` entry point, :func:`manifest`)::

    lmms-eval --model zoo --model_args pretrained=runs/demo/model,batch_size=16 --tasks mme
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from zoo.encoders import map_pixels


def manifest():
    """The ``lmms_eval.models`` entry point: model id ``zoo`` -> :class:`zoo.eval.lmms_model.ZooLMMS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="zoo", simple_class_path="zoo.eval.lmms_model.ZooLMMS")


def _one_image(doc_to_visual: Callable, doc: Any, where: str) -> Image.Image:
    visuals = doc_to_visual(doc)
    visuals = [visuals] if isinstance(visuals, Image.Image) else list(visuals or [])
    if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
        kinds = [type(v).__name__ for v in visuals]
        raise ValueError(f"{where}: zoo models answer about exactly one image, the task gave {kinds}")
    return visuals[0].convert("RGB")


def _question(context: str) -> str:
    # the model's prompt template places the image; a task's own "<image>" marker would be a second placeholder
    return context.replace("<image>", "").strip()


def _check_greedy(gen_kwargs: Mapping[str, Any], where: str) -> None:
    sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
    if sampling or int(gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError(f"{where}: generation_kwargs {dict(gen_kwargs)} ask for sampling or beam search; zoo "
                         "decodes greedily only (do_sample false, temperature 0, num_beams 1)")


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def generate_until(model, requests: Sequence[tuple], task_dict: Mapping, batch_size: int = 16,
                   max_new_tokens: int = 128) -> list[str]:
    """Greedy answers to ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests, in request order.

    Requests are batched in order, ``batch_size`` at a time among those with the same ``gen_kwargs`` (left padding;
    the answers do not depend on the batch). ``gen_kwargs``: ``max_new_tokens`` (default ``max_new_tokens``) and
    ``until`` (stop strings, cut from the answer); sampling or beam search is an error.
    """
    answers: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, (_context, gen_kwargs, *_rest) in enumerate(requests):
        groups.setdefault(repr(sorted(dict(gen_kwargs or {}).items())), []).append(i)
    for rows in groups.values():
        gen_kwargs = dict(requests[rows[0]][1] or {})
        _check_greedy(gen_kwargs, f"task {requests[rows[0]][4]}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            images, questions = [], []
            for i in batch:
                context, _kwargs, doc_to_visual, doc_id, task, split = requests[i]
                where = f"task {task} split {split} doc {doc_id}"
                images.append(_one_image(doc_to_visual, task_dict[task][split][doc_id], where))
                questions.append(_question(context))
            texts = model.answer(images, questions, max_new_tokens=int(gen_kwargs.get("max_new_tokens",
                                                                                       max_new_tokens)),
                                 batch_size=batch_size)
            for i, text in zip(batch, texts):
                answers[i] = _cut(text, until)
    return answers


@torch.no_grad()
def loglikelihood(model, requests: Sequence[tuple], task_dict: Mapping) -> list[tuple[float, bool]]:
    """``(log p(continuation | context, image), continuation is the greedy answer)`` for
    ``(context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)`` requests.

    The continuation is encoded as zoo answers are (after one space, as the prompt template's answer follows), and
    scored by teacher forcing on the spliced sequence: the sum of its tokens' log-probabilities.
    """
    was_training = model.training
    model.eval()
    results = []
    try:
        for context, target, doc_to_visual, doc_id, task, split in requests:
            doc = task_dict[task][split][doc_id]
            where = f"task {task} split {split} doc {doc_id}"
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            prompt = model.encode_prompt(_question(context))
            answer = model.encode_answer(str(continuation).strip())[:-1]  # without the closing EOS
            if not answer:
                raise ValueError(f"{where}: the continuation {continuation!r} encodes to no token")
            ids = torch.tensor([prompt + answer], device=model.device)
            pixels = map_pixels(model.vision.preprocess([_one_image(doc_to_visual, doc, where)]),
                                lambda t: t.to(model.device))
            logits = model(input_ids=ids, pixel_values=pixels).logits[0]  # [T', V] over the spliced sequence
            predicted = logits[-len(answer) - 1:-1].float().log_softmax(-1)
            tokens = torch.tensor(answer, device=logits.device)
            logprob = predicted.gather(-1, tokens[:, None]).sum()
            results.append((float(logprob), bool((predicted.argmax(-1) == tokens).all())))
    finally:
        model.train(was_training)
    return results

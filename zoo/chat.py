"""Chatting with a model about one image (``zoo chat``): greedy answers in the model's own prompt format.

The first question fills the model config's ``prompt`` (its chat template: vicuna_v1 for LLaVA-1.5, Phi-3's for
MoIIE, the bare ``<image>\\n{question}`` of the demo models); every answer is closed by EOS and a follow-up question
is appended after it as plain text, the multi-turn layout the zoo trains (``zoo`` conversation template). The image
is encoded with the first turn and stays in the conversation. A transformers-native model (`zoo.families`) renders
its own chat template over the whole conversation at every turn instead.

>>> chat = ChatSession(model, Image.open("shape.png"))
>>> chat.ask("what color is the shape?")
'red'
>>> chat.ask("is it a circle?")
'no'
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from zoo import images
from zoo.encoders import map_pixels


class ChatSession:
    """A conversation about one image with a `ZooModel` (see the module docstring)."""

    def __init__(self, model, image: Image.Image, max_new_tokens: int = 32):
        if model.tokenizer is None:
            raise ValueError("chat: the model has no tokenizer")
        self.model = model.eval()
        self.max_new_tokens = max_new_tokens
        self.native = hasattr(model, "chat_inputs")  # a transformers-native model: its chat template, its processor
        self.turns: list[tuple[str, str]] = []  # ... and the conversation as turns
        self.reset(image)

    def prompt_ids(self, question: str) -> list[int]:
        """The token ids the model continues for `question`: the prompt template on the first turn, else the
        conversation so far followed by the question."""
        return next_question_ids(self.model, self.ids, question)

    @torch.no_grad()
    def ask(self, question: str) -> str:
        """The model's greedy answer to `question` (which then becomes part of the conversation)."""
        model, tokenizer = self.model, self.model.tokenizer
        if self.native:
            if not question.strip():
                raise ValueError("chat: empty question")
            turns = self.turns + [("user", question.strip())]
            new = model.generate(self.max_new_tokens, **model.chat_inputs(turns, [self.image]))[0]
            answer = tokenizer.decode(new, skip_special_tokens=True).strip()
            self.turns = turns + [("assistant", answer)]
            return answer
        ids = self.prompt_ids(question)
        room = model.config.max_length - (model.num_image_tokens - 1) - len(ids)
        if room < 1:
            raise ValueError(f"chat: the conversation is {len(ids)} tokens with the image, max_length is "
                             f"{model.config.max_length}; start a new one (/reset)")
        input_ids, mask = model.collate_prompts([ids])
        new = model.generate(self.pixels, input_ids.to(model.device), mask.to(model.device),
                             min(self.max_new_tokens, room))[0].tolist()
        eos = tokenizer.eos_token_id
        answer = new[: new.index(eos)] if eos in new else new
        self.ids = ids + answer + [eos]
        return tokenizer.decode(answer, skip_special_tokens=True).strip()

    def reset(self, image: Image.Image | None = None) -> None:
        """Forget the conversation (and switch to `image`, if given)."""
        if image is not None:
            self.image = image.convert("RGB")
            if not self.native:
                self.pixels = map_pixels(self.model.vision.preprocess([self.image]), lambda t: t.to(self.model.device))
        self.ids, self.turns = [], []


def next_question_ids(model, conversation: list[int], question: str) -> list[int]:
    """The ids the model continues for `question` after ``conversation`` (ids so far, answers closed by EOS; empty:
    the first turn, which fills the prompt template)."""
    if not question.strip():
        raise ValueError("chat: empty question")
    if not conversation:
        return model.encode_prompt(question.strip())
    return conversation + model.tokenizer(" " + question.strip(), add_special_tokens=False).input_ids


def conversation_ids(model, turns: Sequence[tuple[str, str | None]]) -> list[int]:
    """The ids of a conversation given as text, ``[(question, answer), ..., (question, None)]``: what `ChatSession`
    builds turn by turn (each answer re-encoded with `ZooModel.encode_answer`, so closed by EOS). The last turn may
    have no answer: the ids then end where the model continues."""
    ids: list[int] = []
    for i, (question, answer) in enumerate(turns):
        ids = next_question_ids(model, ids, question)
        if answer is not None:
            ids = ids + model.encode_answer(answer.strip())
        elif i != len(turns) - 1:
            raise ValueError(f"turn {i}: only the last question may be unanswered")
    return ids


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB; one that is missing or cannot be used is a `zoo.images.ImageError` naming it."""
    return images.open_image(path, f"--image {path}")


def interactive(session: ChatSession, lines: Iterable[str] | None = None, out: TextIO = sys.stdout) -> int:
    """The ``zoo chat`` loop: a question per line; ``/reset`` forgets the conversation, ``/image PATH`` switches the
    image, ``/quit`` (or end of input) stops. Returns the number of answers given."""
    answered = 0
    source = lines if lines is not None else _stdin_lines(out)
    for line in source:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("(new conversation)", file=out)
            continue
        if line.startswith("/image "):
            try:
                session.reset(open_image(line.split(" ", 1)[1].strip()))
            except images.ImageError as e:  # the conversation goes on with the image it had
                print(f"error: {e}", file=out)
                continue
            print("(new image, new conversation)", file=out)
            continue
        try:
            print(f"model> {session.ask(line)}", file=out, flush=True)
            answered += 1
        except ValueError as e:
            print(f"error: {e}", file=out)
    return answered


def _stdin_lines(out: TextIO):
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print(file=out)
            return

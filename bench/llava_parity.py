"""Fidelity of the original LLaVA-1.5 layout: a checkpoint written by LLaVA's own code (PyPI ``llava-torch``) read by
``zoo.load`` and ``zoo convert``, logits compared on the same image and prompt (target: max abs difference <= 1e-4).

Run from the repository root (the first run builds the isolated environment, ~4 min and ~4.5 GB)::

    .venv/bin/python bench/llava_parity.py [--venv runs/bench/llava-torch-venv] [--out runs/bench/llava-parity]

LLaVA's package pins transformers 4.36 and torch 2.0, which the zoo's environment cannot hold, so its side runs in
a virtual environment of its own that this script creates (never the zoo's): `LLAVA_ENVIRONMENT` below, taken from
PyPI for x86_64 / Python 3.11: llava-torch's own pins for torch (2.0.1, a CUDA build that runs on the CPU),
transformers and tokenizers, numpy < 2 for that torch, and ``llava-torch`` itself with ``--no-deps`` (its other pins,
gradio, bitsandbytes, deepspeed, ... serve its web demo and training, not its model code).
`bench/llava_original.py` runs there: it builds a tiny LLaVA-1.5 with LLaVA's classes, saves it in LLaVA's layout,
reloads it LLaVA's way and writes the reference inputs (``tokenizer_image_token``, ``process_images``) and logits.

This script then reads the saved directory with ``zoo.load`` and with ``zoo convert`` + ``zoo.load`` and prints,
side by side: whether the zoo's prompt tokens equal LLaVA's, the largest pixel difference of the two preprocessing
pipelines, and the largest logit difference (a) on LLaVA's own inputs (the weights' layout alone) and (b) end to end,
each side tokenising and preprocessing the image itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

import zoo
from zoo.released import VICUNA_PROMPT, convert_checkpoint

LLAVA_ENVIRONMENT = ["torch==2.0.1", "transformers==4.36.2", "tokenizers==0.15.0", "sentencepiece==0.1.99",
                     "numpy==1.26.4", "pillow==13.0.0", "protobuf==7.36.2", "safetensors==0.8.0"]
LLAVA_PACKAGE = "llava-torch==1.2.2.post1"  # installed --no-deps: its model code needs only the set above
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids (llava.constants)
TARGET = 1e-4


def ensure_environment(venv: Path) -> Path:
    """The isolated llava-torch environment (created once; a stamp records the installed set)."""
    python, stamp = venv / "bin" / "python", venv / "installed.txt"
    wanted = "\n".join([*LLAVA_ENVIRONMENT, LLAVA_PACKAGE]) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return python
    start = time.perf_counter()
    print(f"creating {venv} (llava-torch and its pins; several minutes the first time)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *LLAVA_ENVIRONMENT], check=True)
    subprocess.run([*pip, "--no-deps", LLAVA_PACKAGE], check=True)
    stamp.write_text(wanted)
    print(f"environment ready in {time.perf_counter() - start:.0f} s", flush=True)
    return python


def write_inputs(out: Path) -> tuple[Path, Path, str]:
    """The tokenizer corpus (easy-vqa's questions and answers in LLaVA-1.5's conversation format), a non-square
    test image (64x48: LLaVA's ``pad`` path) and the prompt."""
    import easy_vqa

    from zoo.train.conversations import VICUNA_SYSTEM

    out.mkdir(parents=True, exist_ok=True)
    questions, answers, _ = easy_vqa.get_train_questions()
    lines = [VICUNA_SYSTEM] * 50 + [f"USER: {q} ASSISTANT: {a}" for q, a in zip(questions, answers)]
    corpus, image = out / "corpus.txt", out / "image.png"
    corpus.write_text("\n".join(lines) + "\n")
    with Image.open(easy_vqa.get_test_image_paths()[0]) as source:
        source.convert("RGB").crop((0, 8, 64, 56)).save(image)
    return corpus, image, VICUNA_PROMPT.format(question="what color is the shape?")


@torch.no_grad()
def compare(checkpoint: Path, reference: dict[str, torch.Tensor], image: Path, prompt: str, label: str) -> float:
    """Print and return the end-to-end max abs logit difference of the zoo model read from ``checkpoint``."""
    model = zoo.load(checkpoint).float().eval()
    llava_ids = reference["input_ids"].clone()
    llava_ids[llava_ids == IMAGE_TOKEN_INDEX] = model.image_token_id
    with Image.open(image) as im:
        pixels = model.vision.preprocess([im.convert("RGB")])
    ids = torch.tensor([model.tokenizer(prompt).input_ids])
    same_ids = torch.equal(ids, llava_ids)
    pixel_diff = (pixels - reference["pixel_values"]).abs().max().item()
    layout = (model(input_ids=llava_ids, pixel_values=reference["pixel_values"]).logits
              - reference["logits"]).abs().max().item()
    own = model(input_ids=ids, pixel_values=pixels).logits
    end_to_end = (own - reference["logits"]).abs().max().item() if own.shape == reference["logits"].shape else float("inf")
    print(f"| {label} | {'equal' if same_ids else 'DIFFER'} ({ids.shape[1]} ids) | {pixel_diff:.2e} | {layout:.2e} | "
          f"{end_to_end:.2e} | {'met' if max(layout, end_to_end) <= TARGET else 'MISSED'} |")
    return max(layout, end_to_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("runs/bench/llava-torch-venv"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/llava-parity"))
    args = parser.parse_args()
    python = ensure_environment(args.venv.resolve())
    corpus, image, prompt = write_inputs(args.out)
    subprocess.run([str(python), str(Path(__file__).with_name("llava_original.py")), str(args.out), str(corpus),
                    str(image), prompt], check=True)
    reference = load_file(str(args.out / "reference.safetensors"))
    checkpoint = args.out / "llava-v1.5-tiny"
    converted = convert_checkpoint(checkpoint, args.out / "converted")
    scale = reference["logits"].abs().max().item()
    print(f"\nLLaVA logits {tuple(reference['logits'].shape)}, largest |logit| {scale:.2f}; target <= {TARGET:g}\n")
    print("| read by | prompt ids vs LLaVA's | max abs pixel diff | max abs logit diff, LLaVA's inputs | "
          "max abs logit diff, end to end | target |")
    print("|---|---|---:|---:|---:|---|")
    worst = max(compare(checkpoint, reference, image, prompt, "`zoo.load` (LLaVA's directory)"),
                compare(converted, reference, image, prompt, "`zoo convert` + `zoo.load`"))
    print(f"\nmax abs logit difference: {worst:.2e} ({'met' if worst <= TARGET else 'MISSED'}: target <= {TARGET:g})")


if __name__ == "__main__":
    main()

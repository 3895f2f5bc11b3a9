"""Which expert each image patch and each text token went to in one conversation: MoE-LLaVA's routing figures, live.

`expert_map` runs one teacher-forced forward pass over a conversation (its prompt and the answers given) and reads
`ZooOutput.routing_stats`, where every routed part reports where each of its tokens went (`zoo.moe.TokenRouting`):
sparse LM layers (``lm.layers.<i>``), routed LoRA layers (``lm.lora.<module>``), MoE connectors (``connector``,
``connector.<e>``) and sparse vision blocks (``vision[.<e>].layers.<j>``). Each layer gives the top-1 expert of
every image patch on the image's token grid, the top-k experts and gate weights of each patch, and (LM layers) the
top-1 expert of every text token.

>>> layers = expert_map(model, image, model.encode_prompt("what color is the shape?") + answer_ids)
>>> heatmap(layers[0]).save("lm.layers.0.png")      # one cell per patch, coloured by its expert
>>> beside(image, layers[0])                        # the picture with its patch grid, then the heatmap
>>> layers[0].text                                  # [("<s>", 2), ("what", 0), ...]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from zoo.encoders import map_pixels

NONE_COLOUR = (220, 220, 220)  # a position no expert took (all its slots dropped, or padding)
NULL_COLOUR = (90, 90, 90)  # a null expert (routers with null slots)


@dataclass
class LayerExperts:
    """One routed layer of one conversation. ``experts`` / ``weights`` ``[rows, cols, k]``: each image patch's
    experts by falling gate weight (-1: none), ``[..., 0]`` the one it went to; ``text``: ``(token, top-1 expert)``
    for the conversation's text tokens (LM layers only, else None)."""

    name: str
    num_experts: int
    experts: torch.Tensor
    weights: torch.Tensor
    text: list[tuple[str, int]] | None = None

    @property
    def grid(self) -> torch.Tensor:
        """``[rows, cols]`` the expert each patch went to (-1: none)."""
        return self.experts[..., 0]

    def patch_rows(self) -> list[list]:
        """One table row per patch: ``[row, col, "expert e: weight", ...]`` for its top-k slots."""
        out = []
        for (r, c), _ in _cells(self.grid):
            slots = [f"expert {int(e)}: {float(w):.2f}" for e, w in zip(self.experts[r, c], self.weights[r, c])
                     if int(e) >= 0]
            out.append([r, c, *slots])
        return out


def expert_map(model, image: Image.Image, input_ids: Sequence[int], top_k: int | None = None) -> list[LayerExperts]:
    """The routing of every routed layer for one image and one conversation's token ids (one image placeholder;
    e.g. the prompt followed by the answer, without its closing EOS). ``top_k``: slots kept per patch (default: the
    most any token used). Layers are ordered vision, connector, LM. A dense model gives an empty list."""
    ids = torch.tensor([list(input_ids)], device=model.device)
    pixels = map_pixels(model.vision.preprocess([image.convert("RGB")]), lambda t: t.to(model.device))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    image_positions = out.image_mask[0].cpu()
    text_ids = [t for t in input_ids if t != model.image_token_id]
    tokens = model.tokenizer.convert_ids_to_tokens(text_ids)
    layers = []
    for name, stats in sorted(out.routing_stats.items(), key=lambda item: _part_order(item[0])):
        routing = stats.token_routing
        if routing is None:
            continue
        k = top_k or max(1, int(torch.bincount(routing.token).max()) if routing.token.numel() else 1)
        experts, weights = routing.top_experts(k)
        text = None
        if name.startswith("vision"):
            experts, weights = (_vision_patches(model, name, v) for v in (experts, weights))
        else:
            experts, weights = experts[0], weights[0]  # the one image / conversation: [L, k]
            if name.startswith("lm."):
                text = list(zip(tokens, experts[~image_positions, 0].tolist()))
                experts, weights = experts[image_positions], weights[image_positions]
            rows, cols = patch_grid(experts.shape[0], tuple(model.vision.grid))
            experts, weights = experts.reshape(rows, cols, k), weights.reshape(rows, cols, k)
        layers.append(LayerExperts(name, int(stats.assigned.numel()), experts, weights, text))
    return layers


def _part_order(name: str) -> tuple[int, str]:
    return ({"vision": 0, "connector": 1}.get(name.split(".")[0], 2), name)


def _vision_patches(model, name: str, values: torch.Tensor) -> torch.Tensor:
    """A vision block's ``[N, L, k]`` values of one image as ``[rows, cols, k]`` on its expert's patch grid: prefix
    tokens (class, registers) dropped; a multi-scale expert's last call holds the largest scale's s x s crops
    (``N = s*s``), merged back into one ``(s*h) x (s*w)`` grid."""
    from zoo.encoders.multiscale import merge_chessboard

    index = name.split(".")[1]
    expert = model.vision if index == "layers" else model.vision.experts[int(index)]
    expert = getattr(expert, "expert", expert)  # a multi-scale wrapper holds the expert
    (h, w), prefix = expert.grid, expert.num_prefix_tokens
    patches = values[:, prefix:prefix + h * w].reshape(-1, h, w, values.shape[-1]).permute(0, 3, 1, 2)
    return merge_chessboard(patches, math.isqrt(patches.shape[0]))[0].permute(1, 2, 0)


def patch_grid(count: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of ``count`` image tokens: ``grid`` (the vision tower's) when it holds them, else a square
    when ``count`` is one (a pooled grid), else one strip."""
    if grid is not None and grid[0] * grid[1] == count:
        return grid
    side = math.isqrt(count)
    return (side, side) if side * side == count else (1, count)


def expert_colour(expert: int, num_experts: int) -> tuple[int, int, int]:
    """The colour of an expert in every view: matplotlib's tab10 (tab20 up to 20 experts, turbo beyond)."""
    if expert < 0:
        return NONE_COLOUR
    if expert >= num_experts:
        return NULL_COLOUR
    import matplotlib

    if num_experts <= 10:
        rgb = matplotlib.colormaps["tab10"](expert)
    elif num_experts <= 20:
        rgb = matplotlib.colormaps["tab20"](expert)
    else:
        rgb = matplotlib.colormaps["turbo"](expert / max(num_experts - 1, 1))
    return tuple(round(255 * v) for v in rgb[:3])


def heatmap(layer: LayerExperts, cell: int = 32) -> Image.Image:
    """The layer's top-1 expert per patch as an RGB image of ``cols * cell`` x ``rows * cell`` pixels: one flat cell
    per patch in its expert's colour (`expert_colour`), separated by 1-pixel white lines."""
    rows, cols = layer.grid.shape
    out = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for (r, c), expert in _cells(layer.grid):
        draw.rectangle([c * cell + 1, r * cell + 1, (c + 1) * cell - 1, (r + 1) * cell - 1],
                       fill=expert_colour(expert, layer.num_experts))
    return out


def beside(image: Image.Image, layer: LayerExperts, cell: int = 32, gap: int = 8) -> Image.Image:
    """The image (resized to the patch grid's box, its patch grid drawn over it) and, ``gap`` pixels to its right,
    the layer's `heatmap`: which patch of the picture went where."""
    rows, cols = layer.grid.shape
    width, height = cols * cell, rows * cell
    out = Image.new("RGB", (2 * width + gap, height), (255, 255, 255))
    out.paste(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), (0, 0))
    draw = ImageDraw.Draw(out)
    for i in range(1, cols):
        draw.line([(i * cell, 0), (i * cell, height - 1)], fill=(255, 255, 255))
    for i in range(1, rows):
        draw.line([(0, i * cell), (width - 1, i * cell)], fill=(255, 255, 255))
    out.paste(heatmap(layer, cell), (width + gap, 0))
    return out


def _cells(grid: torch.Tensor):
    rows, cols = grid.shape
    for r in range(rows):
        for c in range(cols):
            yield (r, c), int(grid[r, c])

"""A router added as docs/architecture.md says (one class, one ``@ROUTERS.register`` line; here, in this file) is
used by a model whose config names it, with no other edit to the zoo."""

from __future__ import annotations

import torch
from conftest import tiny_config
from PIL import Image

import zoo
from zoo.config import SparsityConfig, from_dict
from zoo.lm.sparse import sparse_layers
from zoo.moe import ROUTERS, Router, Routing


@ROUTERS.register("first_expert_only")
class FirstExpertRouter(Router):
    """Every token to expert 0 with gate 1 (the probabilities, for the balance losses, are the softmax's)."""

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        index = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        token, expert, score, rank = self.topk_slots(torch.ones_like(logits), index)
        return Routing(token, expert, score, rank, logits, logits.softmax(dim=-1), normalize=False)


def sparse_model(router: str) -> zoo.ZooModel:
    """tiny-llava whose LM sparsity policy (MoE-LLaVA's, top-1, dropless) names `router`; expert 0 is the upcycled dense FFN,
    the other experts and the router are perturbed so that any other choice changes the output."""
    config = tiny_config()
    moe = {"router": router, "top_k": 1, "capacity_factor": None, "eval_capacity_factor": None}  # dropless
    config.lm.sparsity = from_dict(SparsityConfig, {"preset": "moe-llava", "moe": moe}, "lm.sparsity")
    torch.manual_seed(0)
    model = zoo.build(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p[1:] += torch.randn(p[1:].shape, generator=g) * 0.5
            elif ".router." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_a_router_registered_in_one_file_is_picked_up_by_the_config():
    torch.manual_seed(0)
    dense = zoo.build(tiny_config()).eval()
    model = sparse_model("first_expert_only")
    layers = sparse_layers(model)
    assert layers and all(isinstance(layer.moe.router, FirstExpertRouter) for layer in layers.values())

    g = torch.Generator().manual_seed(2)
    images = [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    ids, mask = model.collate_prompts([model.encode_prompt(q) for q in ("what shape is this?", "what color?")],
                                      padding_side="right")
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": model.vision.preprocess(images)}
    with torch.no_grad():
        ref = dense(**batch).logits
        out = model(**batch)
        other = sparse_model("softmax_topk")(**batch).logits
    real = out.attention_mask.bool()
    # expert 0 alone is the dense FFN: the dense model's logits; the stock router on the same weights picks others
    assert (out.logits[real] - ref[real]).abs().max().item() <= 1e-5
    assert (other[real] - ref[real]).abs().max().item() > 1e-2
    assert set(out.routing_stats) == set(layers)
    for stats in out.routing_stats.values():
        assert stats.kept[0].item() == stats.tokens > 0 and stats.kept[1:].sum().item() == 0

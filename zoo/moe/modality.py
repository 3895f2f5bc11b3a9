"""Layers that route by modality: `ModalityMoELayer`, one router per modality over its own candidate experts (MoIIE,
arXiv 2508.09779), and `ModalitySeparatedMoE`, separate expert banks per modality (ERNIE 4.5-VL).

MoIIE: experts split into image-only, shared (inter-modality) and text-only groups. Image tokens choose among
{image-only + shared}, text tokens among {shared + text-only}; each modality has its own router over its candidates,
and both modalities' slots go through one dispatch. With ``image_only=1, text_only=1`` and 4 experts this is the
released MoIIE layout: image candidates [0, 1, 2], text candidates [1, 2, 3].
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import get_dispatch
from zoo.moe.experts import ExpertMLP, StackedExperts
from zoo.moe.layer import (
    MoELayer,
    MoEOutput,
    RoutingStats,
    TokenRouting,
    combine_weights,
    routing_losses,
    routing_stats,
)
from zoo.moe.routing import ROUTERS, Routing, capacity_keep

MODALITIES = ("image", "text")


def modality_groups(num_experts: int, image_only: int, text_only: int) -> dict[str, list[int]]:
    """Candidate experts per modality: image-only experts first, shared in the middle, text-only last."""
    if image_only < 0 or text_only < 0 or image_only + text_only >= num_experts:
        raise ValueError(f"image_only_experts + text_only_experts ({image_only} + {text_only}) must leave at least "
                         f"one shared expert among the {num_experts}")
    return {"image": list(range(num_experts - text_only)), "text": list(range(image_only, num_experts))}


class ModalityMoELayer(nn.Module):
    """MoE FFN with a router per modality. ``forward(x, modality, padding_mask=None)``: ``modality`` is required
    (bool, True at image-token positions); aux losses come per modality (``balance_image``, ``balance_text``, ...)."""

    def __init__(self, config: MoEConfig, groups: dict[str, list[int]]):
        super().__init__()
        if set(groups) != set(MODALITIES):
            raise ValueError(f"groups: expected keys {MODALITIES}, got {sorted(groups)}")
        self.config = config
        self.experts = StackedExperts(config.num_experts, config.hidden_size, config.expert_size, config.expert_form,
                                      config.activation, config.bias)
        self.dispatch = get_dispatch(config.backend)
        self.router_configs = {}
        routers = {}
        for name, ids in groups.items():
            if not ids or min(ids) < 0 or max(ids) >= config.num_experts:
                raise ValueError(f"groups.{name}: expert ids {ids} out of range for {config.num_experts} experts")
            sub = dataclasses.replace(config, num_experts=len(ids), num_groups=1, topk_groups=1, device_groups=1)
            self.router_configs[name] = sub
            routers[name] = ROUTERS.get(config.router, field="router")(sub)
            self.register_buffer(f"{name}_experts", torch.tensor(ids), persistent=False)
        self.routers = nn.ModuleDict(routers)
        self.groups = {k: list(v) for k, v in groups.items()}

    def active_parameters(self) -> int:
        """Parameters one token runs through: its modality's router (the larger one counts) and ``top_k`` experts."""
        bank = sum(p.numel() for p in self.experts.parameters())
        routers = [sum(p.numel() for p in r.parameters()) for r in self.routers.values()]
        rest = sum(p.numel() for p in self.parameters()) - bank - sum(routers)
        E = self.config.num_experts
        return rest + max(routers) + bank * min(self.config.top_k, E) // E

    def set_backend(self, name: str) -> None:
        """Switch the dispatch backend; outputs do not change."""
        self.dispatch = get_dispatch(name)
        self.config.backend = name

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.config
        if modality is None:
            raise ValueError("modality: a MoIIE (modality-routed) layer needs the modality mask (True at image "
                             "tokens); ZooModel passes it from its splice step")
        if modality.shape != x.shape[:-1]:
            raise ValueError(f"modality: shape {tuple(modality.shape)} != tokens {tuple(x.shape[:-1])}")
        flat = x.reshape(-1, cfg.hidden_size)
        is_image = modality.reshape(-1).bool()
        real = torch.ones_like(is_image) if padding_mask is None else padding_mask.reshape(-1).bool()
        tokens, experts, weights, keeps, aux = [], [], [], [], {}
        stats: dict[str, RoutingStats] = {}
        for name, mask in (("image", is_image & real), ("text", ~is_image & real)):
            rows = torch.nonzero(mask).squeeze(1)
            routing: Routing = self.routers[name](flat[rows])
            sub = self.router_configs[name]
            keep = capacity_keep(routing, sub.num_experts, sub.capacity(len(rows), self.training), sub.drop_policy)
            tokens.append(rows[routing.token])
            experts.append(getattr(self, f"{name}_experts")[routing.expert])
            weights.append(combine_weights(routing, keep))
            keeps.append(keep)
            aux.update(routing_losses(sub, routing, suffix=f"_{name}"))
            stats[name] = self._global_stats(routing, keep, name)
        token, expert, weight, keep = (torch.cat(v) for v in (tokens, experts, weights, keeps))
        out = self.experts(flat, token[keep], expert[keep], weight[keep], self.dispatch).to(x.dtype)
        total = RoutingStats(
            assigned=stats["image"].assigned + stats["text"].assigned, kept=stats["image"].kept + stats["text"].kept,
            dropped=stats["image"].dropped + stats["text"].dropped, null=stats["image"].null + stats["text"].null,
            tokens=stats["image"].tokens + stats["text"].tokens,
            entropy=(stats["image"].entropy * stats["image"].tokens + stats["text"].entropy * stats["text"].tokens)
            / max(stats["image"].tokens + stats["text"].tokens, 1),
            by_modality=stats,
            token_routing=TokenRouting(tuple(x.shape[:-1]), token.detach(), expert.detach(), weight.detach()),
        )
        return MoEOutput(out.reshape(x.shape), aux, total, routing)

    def _global_stats(self, routing: Routing, keep: torch.Tensor, name: str) -> RoutingStats:
        """Statistics of one modality's routing with its candidate ids mapped back to the layer's experts."""
        local = routing_stats(routing, keep, self.router_configs[name].num_experts)
        ids = getattr(self, f"{name}_experts")
        place = lambda v: torch.zeros(self.config.num_experts, dtype=v.dtype, device=v.device).index_add_(0, ids, v)  # noqa: E731
        return RoutingStats(place(local.assigned), place(local.kept), local.dropped, local.null, local.tokens,
                            local.entropy)


class ModalitySeparatedMoE(nn.Module):
    """Modality-separated experts (ERNIE 4.5-VL): text tokens route among the text experts and image (or video)
    tokens among the vision experts -- two `MoELayer` s, each with its own router, expert count and width -- while an
    optional shared FFN of width ``shared_size`` runs on every token.

    ``forward(x, padding_mask=None, modality=None)``: without a modality mask every token is text (what ERNIE does
    when a batch holds no image). Statistics list the text experts first, then the vision experts; aux losses are
    named per modality (``balance_text``, ``balance_image``); ``routing`` holds both modalities' slots over the whole
    input with the vision experts numbered after the text experts.
    """

    def __init__(self, text: MoEConfig, image: MoEConfig, shared_size: int = 0):
        super().__init__()
        if text.hidden_size != image.hidden_size:
            raise ValueError(f"hidden_size: text experts read {text.hidden_size}, vision experts {image.hidden_size}")
        self.config = text
        self.text, self.image = MoELayer(text), MoELayer(image)
        self.shared = None
        if shared_size:
            self.shared = ExpertMLP(text.hidden_size, shared_size, text.expert_form, text.activation, text.bias)

    def active_parameters(self) -> int:
        """The shared FFN and the larger of the two modalities' router + ``top_k`` experts (a token runs one)."""
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return shared + max(self.text.active_parameters(), self.image.active_parameters())

    def set_backend(self, name: str) -> None:
        """Switch both modalities' dispatch backend; outputs do not change."""
        self.text.set_backend(name)
        self.image.set_backend(name)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                modality: torch.Tensor | None = None) -> MoEOutput:
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        is_image = torch.zeros(n, dtype=torch.bool, device=x.device) if modality is None else modality.reshape(-1).bool()
        real = torch.ones(n, dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask.reshape(-1).bool()
        out = torch.zeros_like(flat)
        results, aux = {}, {}
        for name, layer, rows in (("text", self.text, ~is_image), ("image", self.image, is_image)):
            index = torch.nonzero(rows).squeeze(1)
            if index.numel() == 0:
                continue
            result = layer(flat[index], padding_mask=real[index])
            out = out.index_copy(0, index, result.output)
            routed = index[real[index]]  # the layer's routing numbers its real (unpadded) tokens
            results[name] = (result, routed)
            aux.update({f"{key}_{name}": value for key, value in result.aux_losses.items()})
        if self.shared is not None:
            out = out + self.shared(flat)
        return MoEOutput(out.reshape(x.shape), aux, self._stats(results), self._routing(results, n, flat.device))

    def _stats(self, results: dict) -> RoutingStats:
        """Both layers' statistics over one expert axis (text experts, then vision experts)."""
        sizes = {"text": self.text.config.num_experts, "image": self.image.config.num_experts}
        by_modality = {}
        for name in MODALITIES:
            if name in results:
                stats = results[name][0].stats
            else:
                zero = torch.zeros(sizes[name], dtype=torch.long, device=self.text.router.weight.device)
                stats = RoutingStats(zero, zero, zero.sum(), zero.sum(), 0, torch.tensor(float("nan")))
            before = sizes["text"] if name == "image" else 0
            after = sizes["image"] if name == "text" else 0
            wide = lambda v, b=before, a=after: torch.cat([v.new_zeros(b), v, v.new_zeros(a)])  # noqa: E731
            by_modality[name] = RoutingStats(wide(stats.assigned), wide(stats.kept), stats.dropped, stats.null,
                                             stats.tokens, stats.entropy)
        image, text = by_modality["image"], by_modality["text"]
        tokens = image.tokens + text.tokens
        entropy = sum(s.entropy * s.tokens for s in (image, text) if s.tokens) / max(tokens, 1)
        return RoutingStats(image.assigned + text.assigned, image.kept + text.kept, image.dropped + text.dropped,
                            image.null + text.null, tokens, torch.as_tensor(entropy), by_modality=by_modality)

    def _routing(self, results: dict, num_tokens: int, device: torch.device) -> Routing:
        """One `Routing` over the whole input: each modality's slots on its own tokens, vision experts offset."""
        width = self.text.config.num_experts + self.image.config.num_experts
        logits = torch.zeros(num_tokens, width, device=device)
        probs = torch.zeros(num_tokens, width, device=device)
        parts = []
        for name, offset in (("text", 0), ("image", self.text.config.num_experts)):
            if name not in results:
                continue
            result, rows = results[name]
            r = result.routing
            columns = slice(offset, offset + r.logits.shape[1])
            logits[rows, columns], probs[rows, columns] = r.logits, r.probs
            parts.append((rows[r.token], r.expert + offset, r.score, r.rank))
        token, expert, score, rank = (torch.cat([p[i] for p in parts]) if parts else torch.zeros(0, device=device)
                                      for i in range(4))
        return Routing(token.long(), expert.long(), score, rank.long(), logits, probs, normalize=True)

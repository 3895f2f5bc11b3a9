"""zoo.moe: sparse mixture-of-experts layers in pure PyTorch.

>>> from zoo.moe import MoEConfig, MoELayer, upcycle
>>> layer = MoELayer(MoEConfig(hidden_size=64, expert_size=128, num_experts=8, top_k=2))
>>> out = layer(x)                       # MoEOutput: .output, .aux_losses (unscaled), .stats, .routing
>>> moe = upcycle(llama_mlp, num_experts=4, top_k=2)   # E copies of a dense FFN + a fresh router
>>> moe = from_transformers(mixtral_block)             # same outputs and expert choices as transformers

Parts are registered by name: routers in `ROUTERS`, dispatch backends in `DISPATCHERS`.
"""

from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import DISPATCHERS
from zoo.moe.experts import DenseFFN, ExpertMLP, StackedExperts, activation_name, read_ffn
from zoo.moe.hf import from_transformers, to_transformers
from zoo.moe.layer import MoELayer, MoEOutput, RoutingStats, TokenRouting, update_router_biases
from zoo.moe.routing import ROUTERS, Router, Routing, capacity_keep
from zoo.moe.upcycle import upcycle

__all__ = [
    "DISPATCHERS", "ROUTERS", "DenseFFN", "ExpertMLP", "MoEConfig", "MoELayer", "MoEOutput", "Router", "Routing",
    "RoutingStats", "StackedExperts", "TokenRouting", "activation_name", "capacity_keep", "from_transformers", "read_ffn",
    "to_transformers", "update_router_biases", "upcycle",
]

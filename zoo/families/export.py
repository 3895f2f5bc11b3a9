"""An upcycled dense base written as the transformers sparse model it has become: Qwen3-VL upcycled by a zoo policy
is a Qwen3-VL-MoE checkpoint that ``Qwen3VLMoeForConditionalGeneration`` loads, when the policy fits that layout.

Qwen3-VL-MoE routes softmax top-k, renormalised, over SwiGLU experts without shared experts, dropless; its dense
layers are ``mlp_only_layers``. A policy beyond that (dropping capacity, shared experts, per-modality routers, BigMac,
null experts) is an error naming the field; such a model is saved by `FamilyModel.save_pretrained` with its policy
instead.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from zoo.checkpoint import staged_directory
from zoo.families.model import FamilyModel
from zoo.lm.sparse import SparseFFN, decoder_layers
from zoo.moe.hf import LAYOUTS, check_layout, transformers_state
from zoo.moe.layer import MoELayer

SPARSE_OF = {"qwen3_vl": "qwen3_vl_moe"}  # dense base -> the transformers model type of its sparse version


def export_sparse(model: FamilyModel, directory: str | Path) -> Path:
    """Write an upcycled dense base (``qwen3_vl`` with ``lm.sparsity``) as a ``qwen3_vl_moe`` transformers
    checkpoint (and the processor); raises ValueError naming what the target cannot express."""
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    base = model.spec.model_type
    if base not in SPARSE_OF or model.config.lm.sparsity is None:
        raise ValueError(f"{model.config.name}: export_sparse writes an upcycled {', '.join(SPARSE_OF)} model "
                         f"(a {base} with lm.sparsity {model.config.lm.sparsity})")
    if model.config.lm.lora is not None:
        raise ValueError("lm.lora: Qwen3-VL-MoE has no LoRA layers; merge or drop them first")
    text_model = model.text_model()
    sparse = {i: layer.mlp for i, layer in enumerate(decoder_layers(text_model)) if isinstance(layer.mlp, SparseFFN)}
    layout = LAYOUTS[SPARSE_OF[base]]
    configs = {i: ffn.moe.config for i, ffn in sparse.items()}
    for i, ffn in sparse.items():
        if not isinstance(ffn.moe, MoELayer):
            raise ValueError(f"lm.sparsity: layer {i} routes by modality; {layout.kind} has one router per layer")
        check_layout(layout, configs[i])
    first = next(iter(configs.values()))
    shapes = {(c.num_experts, c.top_k, c.expert_size) for c in configs.values()}
    if len(shapes) > 1:
        raise ValueError(f"lm.sparsity: layers differ in experts / top_k / width {sorted(shapes)}; {layout.kind} "
                         "has one expert shape")
    data = copy.deepcopy(model.hf.config.to_dict())
    for sub in ("text_config", "vision_config"):
        data[sub].pop("model_type", None)
    data.pop("model_type", None)
    data["text_config"].update(num_experts=first.num_experts, num_experts_per_tok=first.top_k,
                               moe_intermediate_size=first.expert_size, decoder_sparse_step=1,
                               mlp_only_layers=[i for i in range(len(decoder_layers(text_model))) if i not in sparse])
    config = AutoConfig.for_model(layout.kind, **{k: v for k, v in data.items() if k not in ("architectures",)})
    state = {}
    prefix = model.spec.decoders["lm"] + ".layers."
    for name, tensor in model.hf.state_dict().items():
        if ".mlp.moe." not in name:
            state[name] = tensor
    for i, ffn in sparse.items():
        state.update(transformers_state(layout, ffn.moe.state_dict(), prefix=f"{prefix}{i}.mlp."))
    with torch.device("meta"):
        target = Qwen3VLMoeForConditionalGeneration._from_config(config)
    target.load_state_dict({k: v.detach() for k, v in state.items()}, assign=True, strict=True)
    with staged_directory(directory) as staging:  # files renamed into place whole, checksums.json beside them
        target.save_pretrained(staging)
        if model.processor is not None:
            model.processor.save_pretrained(staging)
    return Path(directory)


__all__ = ["SPARSE_OF", "export_sparse"]

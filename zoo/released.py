"""Released checkpoint layouts of the LLaVA family -> `ZooModel`: the original LLaVA(-1.5) layout, MoE-LLaVA's
(DeepSpeed-MoE names) and CuMo's. The llava-hf layout (``LlavaForConditionalGeneration``) is `zoo.convert`'s.

All three are forks of one codebase: a transformers causal LM whose ``config.json`` carries the multimodal settings
(``mm_vision_tower`` / ``mm_image_tower``, ``mm_projector_type``, ``mm_vision_select_layer``, ...), with the
projector and, when it was trained or saved, the vision tower inside the LM's state dict:

==============  =========================================  ==============================================  ========
layout          vision tower (when saved)                  projector                                       LM
==============  =========================================  ==============================================  ========
``llava``       ``model.vision_tower.vision_tower.*``      ``model.mm_projector.{0,2}.*`` (mlp2x_gelu)     Llama
``moe-llava``   ``model.image_tower.image_tower.*``        ``model.mm_projector.image_spatial_proj.*``     StableLM / Phi / Qwen, DeepSpeed-MoE FFNs
``cumo``        ``model.vision_tower.vision_model.*``      ``model.mm_projector.{gate,experts.{e}.{0,2}}``  Mistral
                (CLIP-MoE: ``encoder.layers.{i}.{gate,experts.{e}.fc1/fc2}``)
==============  =========================================  ==============================================  ========

A tower that is not in the checkpoint (LLaVA-1.5 never saves its frozen CLIP) is read from ``vision_tower`` (a
transformers CLIP/SigLIP directory or hub id; default: the name in the config, resolved offline from the cache).
Every tensor is placed by name and checked by shape; a tensor left over or missing is an error naming it.
Safetensors are preferred; ``.bin`` / ``.pt`` files are read with ``torch.load(weights_only=True)`` only.

>>> model = zoo.released.from_released("path/to/llava-v1.5-7b", vision_tower="path/to/clip-vit-large-patch14-336")
>>> zoo.catalogue.convert_checkpoint("path/to/MoE-LLaVA-Phi2-2.7B-4e", "runs/moe-llava-phi2")   # `zoo convert`

Where each name and rule was read from
--------------------------------------
``llava``: checked against LLaVA's own code, not only its files: `bench/llava_parity.py` builds a model with PyPI's
``llava-torch`` 1.2.2.post1 (``LlavaLlamaForCausalLM``, ``initialize_vision_modules``, ``save_pretrained``), and
``zoo.load`` / ``zoo convert`` give its logits to within 2e-6 (README). MoE-LLaVA and CuMo are not on PyPI; their
names and rules were read from their repositories (MoE-LLaVA: PKU-YuanGroup/MoE-LLaVA at 6cb5f66; CuMo:
SHI-Labs/CuMo at 6cd979a; DeepSpeed: microsoft/DeepSpeed at tag v0.9.5, the version MoE-LLaVA's pyproject.toml
pins for its MoE layer), and `tests/test_released_gating.py` checks the zoo's gating on examples worked by hand
from the rules below.

MoE-LLaVA

- ``model_type`` ``moe_llava_phi`` / ``moe_llava_stablelm`` / ``moe_llava_qwen``: the ``AutoConfig.register`` calls
  of ``moellava/model/language_model/llava_{phi,stablelm,qwen}_moe.py``.
- ``moe`` config block (``moe_layers_idx``, ``num_experts`` per layer, ``top_k_experts``, ``capacity_factor``,
  ``eval_capacity_factor``, ``min_capacity``, ``router_aux_loss_coef``, ``use_residual``): ``MoELLaVAPhiConfig``
  and ``initialize_moe_modules`` in ``llava_phi_moe.py`` (the siblings match); ``moe_mode`` ``sparse`` = layers
  ``range(L)[::2]`` there; training defaults in ``moellava/train/train.py`` (``eval_capacity_factor`` 2.0,
  ``min_capacity`` 0, coefficient 0.01) and ``scripts/v1/phi2/finetune_moe.sh`` (4 experts, top-2, capacity 1.5).
- Tensor names: ``initialize_moe_modules`` replaces ``model.layers[i].mlp`` by DeepSpeed's ``MoE(hidden_size,
  expert=mlp, ...)``, whose ``deepspeed/moe/layer.py`` holds ``deepspeed_moe`` (a ``MOELayer``), whose gate is
  ``TopKGate.wg`` (``sharded_moe.py``: ``Linear(model_dim, num_experts, bias=False)``) and whose experts are
  ``experts.deepspeed_experts.{e}`` (``experts.py``: deep copies of the dense MLP, so its own names inside);
  hence ``model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight`` and
  ``model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.<mlp names>`` (`zoo.lm.interop`). The
  projector ``model.mm_projector.image_spatial_proj.*`` and ``image_projector_type``: ``build_projector`` in
  ``moellava/model/multimodal_projector/builder.py``; the tower ``model.image_tower.image_tower.*`` and
  ``mm_image_tower``: ``moellava/model/llava_arch.py`` and ``multimodal_encoder/clip_encoder.py``.
- Gating (DeepSpeed v0.9.5 ``sharded_moe.py``: ``top2gating``, ``_capacity``, ``TopKGate.forward``): softmax of
  the fp32 router logits; first expert the argmax; capacity ``max(min_capacity, ceil(T / E * 2 * cf))`` with
  ``eval_capacity_factor`` outside training, over all ``T = B * S`` positions; an expert's buffer takes every first
  choice in token order, then the second choices; slots past the capacity are dropped; the two gates are
  renormalised over the slots kept (a token left with one expert weighs 1 on it); balance loss
  ``E^2 * mean_e(mean_t p_te * share of first choices on e)``, before dropping, summed over the layers and scaled by
  ``router_aux_loss_coef`` (``llava_phi_moe.py`` forward). Two differences, on purpose: DeepSpeed v0.9.5 picks the
  second expert by Gumbel sampling in training *and* at inference (so a released model answers differently from run
  to run), the zoo deterministically (``second_expert_sampling`` samples in training only); and padding positions,
  which DeepSpeed routes and counts against the capacity, are kept out of routing.

CuMo

- Config keys ``mm_projector_type: smoe_mlp``, ``num_experts``, ``num_selected``, ``balance_loss_coef``,
  ``router_z_loss_coef``, ``mlp_smoe``, ``clip_smoe``, ``scales``: ``ModelArguments`` and the ``model.config``
  assignments of ``cumo/train/train.py``.
- MLP-MoE tensors ``model.mm_projector.gate.weight`` [E, C] and ``model.mm_projector.experts.{e}.{0,2}.*``:
  ``MLPMoE`` in ``cumo/model/multimodal_projector/builder.py`` (``gate = Linear(mm_channels, E, bias=False)``,
  experts ``Sequential(Linear, GELU, Linear)``).
- CLIP-MoE tensors ``model.vision_tower.vision_model.encoder.layers.{i}.gate.weight`` and
  ``...experts.{e}.fc1/fc2.*``, no ``post_layernorm``: ``CLIPEncoderMoELayer`` / ``CLIPSMoEVisionTransformer`` in
  ``cumo/model/multimodal_encoder/clip_smoe.py`` (the post-layernorm is commented out), held as ``vision_model``
  by ``clip_encoder.py``.
- Gating (``MLPMoE.forward``, ``CLIPEncoderMoELayer.forward``): softmax in fp32, top-``num_selected``, the weights
  divided by their sum; no capacity, nothing dropped; balance ``E^2 * mean_{b,e}(P_be * F_be)`` per image ``b``
  (``P`` its mean probabilities, ``F`` the share of its tokens whose first choice is ``e``); z-loss
  ``mean_t logsumexp(z_t)^2``; the CLIP-MoE's losses averaged over its layers (``torch.stack(...).mean()``); both
  scaled by the coefficients in ``cumo/model/language_model/llava_mistral.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zoo.config import ConnectorConfig, LMConfig, ModelConfig, SparsityConfig, TokenizerConfig, VisionConfig, from_dict
from zoo.errors import UserError
from zoo.hf import config_to_dict

if TYPE_CHECKING:
    from zoo.model import ZooModel

VICUNA_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:")
# model_type in a released config.json -> the transformers model type of its LM
LM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "moe_llava_phi": "phi",
            "moe_llava_stablelm": "stablelm", "moe_llava_qwen": "qwen2", "llava_phi": "phi"}
LEGACY_LM_KEYS = ("rope_theta", "rope_scaling")
TOWER_PREFIXES = {"llava": ("model.vision_tower.vision_tower.",),
                  "moe-llava": ("model.image_tower.image_tower.", "transformer.image_tower.image_tower."),
                  "cumo": ("model.vision_tower.vision_model.",)}
PROJECTOR_PREFIXES = {"llava": ("model.mm_projector.",),
                      "moe-llava": ("model.mm_projector.image_spatial_proj.", "transformer.mm_projector.image_spatial_proj."),
                      "cumo": ("model.mm_projector.",)}


class ReleasedCheckpointError(UserError, ValueError):
    """A released checkpoint is incomplete, inconsistent with its config, or uses a part the zoo cannot hold."""


# ---------------------------------------------------------------------------------------------------------------
# Files


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``*.safetensors`` (one file or shards, with or without an index),
    else ``*.bin`` / ``*.pt`` through ``torch.load(weights_only=True)`` (never unpickling code)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if files:
        load = lambda p: load_file(str(p), device="cpu")  # noqa: E731
    else:
        files = sorted([*directory.glob("*.bin"), *directory.glob("*.pt")])
        load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    if not files:
        raise ReleasedCheckpointError(f"{directory}: no *.safetensors, *.bin or *.pt weight files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load(path)
        except Exception as e:  # safetensors / pickle report corrupt files with several types
            raise ReleasedCheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from e
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ReleasedCheckpointError(f"{path}: not a state dict of tensors")
        clash = state.keys() & part.keys()
        if clash:
            raise ReleasedCheckpointError(f"{path}: tensor {sorted(clash)[0]!r} is also in another weight file")
        state.update(part)
    return state


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReleasedCheckpointError(f"{path}: cannot read the checkpoint config ({e})") from e


def detect_layout(config: dict) -> str:
    """``zoo``, ``llava-hf``, ``moe-llava``, ``cumo`` or ``llava`` from a checkpoint's ``config.json`` mapping."""
    model_type = str(config.get("model_type", ""))
    if "zoo_format" in config:
        return "zoo"
    if "text_config" in config and model_type == "llava":
        return "llava-hf"
    if model_type.startswith("moe_llava") or "mm_image_tower" in config:
        return "moe-llava"
    if config.get("mm_projector_type") == "smoe_mlp" or "clip_smoe" in config:
        return "cumo"
    if "mm_vision_tower" in config:
        return "llava"
    raise ReleasedCheckpointError(f"config.json: model_type {model_type!r} is not a known layout (zoo, llava-hf, "
                                  "llava, moe-llava, cumo)")


# ---------------------------------------------------------------------------------------------------------------
# Parts


def _take(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Pop the tensors under the first of `prefixes` that occurs, with the prefix stripped."""
    for prefix in prefixes:
        keys = [k for k in state if k.startswith(prefix)]
        if keys:
            return {k[len(prefix):]: state.pop(k) for k in keys}
    return {}


def _lm_config(config: dict) -> dict:
    """The LM's transformers config: the keys its config class knows, under the LM's own model type."""
    from transformers import AutoConfig

    model_type = LM_TYPES.get(config.get("model_type"))
    if model_type is None:
        raise ReleasedCheckpointError(f"config.json: model_type {config.get('model_type')!r} names no known LM "
                                      f"(known: {', '.join(sorted(LM_TYPES))})")
    if model_type == "qwen2" and "kv_channels" in config:  # the original Qwen config
        config = {"vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
                  "intermediate_size": config["intermediate_size"] // 2,  # Qwen counts w1 and w2 together
                  "num_hidden_layers": config["num_hidden_layers"], "num_attention_heads": config["num_attention_heads"],
                  "num_key_value_heads": config["num_attention_heads"], "rms_norm_eps": config["layer_norm_epsilon"],
                  "rope_theta": config.get("rotary_emb_base", 10000), "tie_word_embeddings": False,
                  "max_position_embeddings": config.get("max_position_embeddings", config.get("seq_length", 2048))}
    # the config class's own keys, and the RoPE keys transformers 5 folds into rope_parameters (older releases
    # write them at the top level; dropping them would silently reset e.g. Mistral-v0.2's theta of 1e6)
    known = {*AutoConfig.for_model(model_type).to_dict(), *LEGACY_LM_KEYS}
    out = {k: v for k, v in config.items() if k in known and k not in ("architectures", "transformers_version",
                                                                       "_name_or_path", "torch_dtype", "dtype")}
    return {**out, "model_type": model_type}


def _vision(config: dict, tower: dict[str, torch.Tensor], vision_tower: str | None, layout: str
            ) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """The vision expert's config and, when the checkpoint holds the tower, its weights (transformers names)."""
    from transformers import AutoConfig

    name = vision_tower or config.get("mm_vision_tower") or config.get("mm_image_tower")
    if not name:
        raise ReleasedCheckpointError("config.json: names no vision tower (mm_vision_tower / mm_image_tower); pass "
                                      "vision_tower")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ReleasedCheckpointError(f"config.json: mm_vision_select_feature {select!r} is not 'patch' or 'cls_patch'")
    fields = dict(kind="hf", feature_layer=int(config.get("mm_vision_select_layer", -2)),
                  drop_prefix=select == "patch", resize="pad" if config.get("image_aspect_ratio") == "pad" else "squash",
                  scales=config.get("scales") if config.get("scales") not in (None, [1]) else None)
    if config.get("clip_smoe"):  # CuMo's CLIP-MoE: the cumo policy with the checkpoint's expert counts
        fields["sparsity"] = from_dict(SparsityConfig, {"preset": "cumo", "moe": {
            "num_experts": int(config.get("num_experts", 4)), "top_k": int(config.get("num_selected", 2))}},
            path="vision.sparsity")
    tower = {k.removeprefix("vision_model."): v for k, v in tower.items()}
    if not tower:  # the released weights hold no tower: read it from its own checkpoint
        return VisionConfig(name=str(name), pretrained=True, **fields), {}
    try:
        hf = AutoConfig.from_pretrained(str(name))
    except OSError as e:
        raise ReleasedCheckpointError(f"the checkpoint holds the vision tower's weights but its architecture is "
                                      f"unknown: {name!r} is not a local dir or cached hub id; pass vision_tower "
                                      f"({e})") from e
    hf = getattr(hf, "vision_config", hf)
    if layout == "moe-llava" and hf.model_type == "siglip_vision_model" and select == "patch":
        warnings.warn("MoE-LLaVA's 'patch' feature drops the first SigLIP token although SigLIP has no CLS; the zoo "
                      "keeps all patch tokens (one image token more than the release)", stacklevel=3)
    return VisionConfig(kwargs=config_to_dict(hf), **fields), tower


def _projector(config: dict, state: dict[str, torch.Tensor], layout: str
               ) -> tuple[ConnectorConfig, dict[str, torch.Tensor]]:
    """The connector's config and weights in zoo names (`MLPProjector` or CuMo's `MoEMLPConnector`)."""
    weights = _take(state, PROJECTOR_PREFIXES[layout])
    if not weights:
        raise ReleasedCheckpointError(f"the checkpoint holds no projector ({' or '.join(PROJECTOR_PREFIXES[layout])}*)")
    kind = config.get("mm_projector_type") or config.get("image_projector_type") or "linear"
    if kind == "smoe_mlp":  # CuMo: gate [E, C] + E x Sequential(Linear, GELU, Linear)
        e = int(config.get("num_experts", 4))
        try:
            w_in = torch.stack([weights.pop(f"experts.{i}.0.weight").t() for i in range(e)])
            b_in = torch.stack([weights.pop(f"experts.{i}.0.bias") for i in range(e)])
            w_out = torch.stack([weights.pop(f"experts.{i}.2.weight").t() for i in range(e)])
            b_out = torch.stack([weights.pop(f"experts.{i}.2.bias") for i in range(e)])
            router = weights.pop("gate.weight")
        except KeyError as err:
            raise ReleasedCheckpointError(f"model.mm_projector.{err.args[0]}: missing (num_experts {e})") from None
        if weights:
            raise ReleasedCheckpointError(f"model.mm_projector.{sorted(weights)[0]}: not a tensor of CuMo's MLP-MoE")
        connector = ConnectorConfig(kind="moe_mlp", projector="mlp2x_gelu",
                                    moe={"num_experts": e, "top_k": int(config.get("num_selected", 2))},
                                    coefficients={"balance": float(config.get("balance_loss_coef", 0.1)),
                                                  "z_loss": float(config.get("router_z_loss_coef", 0.01))})
        return connector, {"router.weight": router, "experts.w_in": w_in, "experts.b_in": b_in,
                           "experts.w_out": w_out, "experts.b_out": b_out}
    if kind == "linear":  # a bare nn.Linear in the release, the first (only) layer of the zoo's Sequential
        weights = {k if k[0].isdigit() else f"0.{k}": v for k, v in weights.items()}
    elif not re.fullmatch(r"mlp\d+x_gelu", kind):
        raise ReleasedCheckpointError(f"config.json: projector type {kind!r} has no zoo equivalent (linear, "
                                      "mlpNx_gelu, smoe_mlp)")
    return ConnectorConfig(kind="mlp", projector=kind), {f"layers.{k}": v for k, v in weights.items()}


def _clip_moe_names(tower: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """CuMo's CLIP-MoE block tensors (``encoder.layers.{i}.gate.weight`` [E, d], ``encoder.layers.{i}.experts.{e}.
    fc1/fc2``) in the zoo's names (``encoder.layers.{i}.mlp.moe.router.weight``, stacked ``experts.w_in`` [E, d, f],
    ``b_in``, ``w_out`` [E, f, d], ``b_out``). Blocks after the feature layer are dense in the zoo and never run
    into the features: their CuMo tensors are dropped and their indices returned."""
    out, blocks, unreached = {}, {}, set()
    for key, value in tower.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(gate\.weight|experts\.(\d+)\.(fc[12])\.(weight|bias))$", key)
        if m is None:
            out[key] = value
            continue
        i = int(m.group(1))
        if f"encoder.layers.{i}.mlp.moe.router.weight" not in ours:
            unreached.add(i)
        elif m.group(2) == "gate.weight":
            out[f"encoder.layers.{i}.mlp.moe.router.weight"] = value
        else:
            blocks.setdefault(i, {})[(int(m.group(3)), m.group(4), m.group(5))] = value
    for i, parts in blocks.items():
        experts = sorted({e for e, _, _ in parts})
        try:
            out[f"encoder.layers.{i}.mlp.moe.experts.w_in"] = torch.stack([parts[(e, "fc1", "weight")].t() for e in experts])
            out[f"encoder.layers.{i}.mlp.moe.experts.b_in"] = torch.stack([parts[(e, "fc1", "bias")] for e in experts])
            out[f"encoder.layers.{i}.mlp.moe.experts.w_out"] = torch.stack([parts[(e, "fc2", "weight")].t() for e in experts])
            out[f"encoder.layers.{i}.mlp.moe.experts.b_out"] = torch.stack([parts[(e, "fc2", "bias")] for e in experts])
        except KeyError as err:
            e, layer, kind = err.args[0]
            raise ReleasedCheckpointError(f"encoder.layers.{i}.experts.{e}.{layer}.{kind}: missing from the CLIP-MoE "
                                          "tower") from None
    return out, sorted(unreached)


def _sparsity(config: dict) -> SparsityConfig:
    """MoE-LLaVA's ``moe`` block (layers, experts per layer, top-k, capacities, aux coefficient) as a policy."""
    moe = config.get("moe") or {}
    layers, experts = moe.get("moe_layers_idx"), moe.get("num_experts")
    if not layers or not experts:
        raise ReleasedCheckpointError("config.json: moe.moe_layers_idx / moe.num_experts missing")
    experts = experts if isinstance(experts, list) else [experts] * len(layers)
    if len(set(experts)) != 1:
        raise ReleasedCheckpointError(f"config.json: moe.num_experts {experts} differs between layers; a zoo policy "
                                      "gives every sparse layer the same experts")
    fields = {"num_experts": experts[0], "top_k": moe.get("top_k_experts", 2),
              "capacity_factor": moe.get("capacity_factor", 1.5),
              "eval_capacity_factor": moe.get("eval_capacity_factor", 2.0), "min_capacity": moe.get("min_capacity", 0)}
    return from_dict(SparsityConfig, {"preset": "moe-llava", "layers": list(layers), "moe": fields,
                                      "coefficients": {"balance": moe.get("router_aux_loss_coef", 0.01)}},
                     path="lm.sparsity")


def _load(part: torch.nn.Module, state: dict[str, torch.Tensor], what: str, unused_ok: tuple[str, ...] = ()) -> None:
    """Strict load naming the first missing / unexpected / mis-shaped tensor; `unused_ok`: target keys that may stay
    as built (parts the release does not have and the zoo never reads)."""
    ours = part.state_dict()
    missing = [k for k in ours if k not in state and not k.startswith(unused_ok)]
    extra = [k for k in state if k not in ours]
    shape = [k for k in state if k in ours and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or extra or shape:
        key = (missing or extra or shape)[0]
        why = "missing" if missing else "not in the zoo model" if extra else (
            f"shape {tuple(state[key].shape)}, the zoo model has {tuple(ours[key].shape)}")
        raise ReleasedCheckpointError(f"{what}.{key}: {why} ({len(missing)} missing, {len(extra)} unexpected, "
                                      f"{len(shape)} of another shape)")
    part.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def from_released(directory: str | Path, vision_tower: str | None = None, tokenizer=None) -> ZooModel:
    """A `ZooModel` holding the weights of a released ``llava``, ``moe-llava`` or ``cumo`` checkpoint directory
    (see the module docstring). ``vision_tower``: the tower's transformers directory or hub id when the checkpoint does
    not hold it (or to override the name in its config); ``tokenizer``: default, the one in `directory`."""
    from zoo.model import ZooModel
    from zoo.tokenizer import build_tokenizer

    directory = Path(directory)
    config = read_config(directory)
    layout = detect_layout(config)
    if layout not in TOWER_PREFIXES:
        raise ReleasedCheckpointError(f"{directory}: a {layout} checkpoint; zoo.load reads it directly")
    state = read_state_dict(directory)
    tower = _take(state, TOWER_PREFIXES[layout])
    sparse_tower = any(re.search(r"\.(experts\.\d+|gate)\.", k) for k in tower)
    if sparse_tower and not config.get("clip_smoe"):
        raise ReleasedCheckpointError("config.json: the vision tower has MoE blocks (experts / gate tensors) but "
                                      "clip_smoe is not set")
    vision, tower = _vision(config, tower, vision_tower, layout)
    connector, projector = _projector(config, state, layout)
    tok_config = TokenizerConfig(name=str(directory))
    tokenizer = tokenizer or build_tokenizer(tok_config)
    model_config = ModelConfig(
        name=directory.name, family={"cumo": "cumo", "moe-llava": "moe-llava"}.get(layout, "llava"),
        description=f"converted from the released {layout} layout ({directory.name})",
        vision=vision, connector=connector,
        lm=LMConfig(config=_lm_config(config), sparsity=_sparsity(config) if layout == "moe-llava" else None),
        tokenizer=tok_config, prompt=VICUNA_PROMPT if layout != "cumo" else "[INST] <image>\n{question} [/INST]",
        max_length=int(config.get("tokenizer_model_max_length") or config.get("max_position_embeddings") or 2048),
        image_token_id=tokenizer.convert_tokens_to_ids(tok_config.image_token))
    model = ZooModel(model_config, tokenizer)
    if tower:
        target = getattr(model.vision, "expert", model.vision).model
        unused: tuple[str, ...] = ()
        if layout == "cumo":  # no post-layernorm in CuMo's tower: never read below the last block
            tower, unreached = _clip_moe_names(tower, target.state_dict())
            unused = ("post_layernorm", *(f"encoder.layers.{i}." for i in unreached))
        _load(target, tower, "vision", unused_ok=unused)
    _load(model.connector, projector, "connector")
    if layout == "moe-llava":
        from zoo.lm.interop import import_moe_llava_state_dict

        try:
            state = import_moe_llava_state_dict(model.lm, state)
        except ValueError as e:  # a tensor of the checkpoint that does not fit the policy its config describes
            raise ReleasedCheckpointError(str(e)) from e
    else:
        lm_state = {k: state.pop(k) for k in list(state) if k.startswith("model.") or k == "lm_head.weight"}
        if getattr(model.lm.config, "tie_word_embeddings", False):
            lm_state.setdefault("lm_head.weight", lm_state.get("model.embed_tokens.weight"))
        _load(model.lm, lm_state, "lm")
    if state:
        raise ReleasedCheckpointError(f"{sorted(state)[0]}: a tensor of the checkpoint that no zoo part holds "
                                      f"({len(state)} left over)")
    return model.eval()


def _moe_block(model: ZooModel) -> dict:
    """MoE-LLaVA's ``moe`` config block for the model's LM policy; a policy field that the block cannot carry (so
    that `from_released` would rebuild another layer) is an error naming it."""
    from zoo.lm.sparse import select_layers
    from zoo.moe.config import MoEConfig

    policy = model.config.lm.sparsity
    if policy is None:
        raise ValueError("lm.sparsity: a dense LM; MoE-LLaVA's layout holds a sparse one (sparsify it first)")
    layers = select_layers(policy.layers, model.lm.config.num_hidden_layers)
    moe = policy.moe
    block = {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": layers,
             "num_experts": [moe.get("num_experts", 4)] * len(layers), "top_k_experts": moe.get("top_k", 2),
             "capacity_factor": moe.get("capacity_factor"), "eval_capacity_factor": moe.get("eval_capacity_factor"),
             "min_capacity": moe.get("min_capacity", 0), "use_residual": False, "ep_size": 1,
             "router_aux_loss_coef": policy.coefficients.get("balance", 0.0)}
    back = _sparsity({"moe": block})
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    for key in sorted(set(moe) | set(back.moe)):
        ours, theirs = moe.get(key, defaults.get(key)), back.moe.get(key, defaults.get(key))
        if ours != theirs:
            raise ValueError(f"lm.sparsity.moe.{key}: {ours!r} has no place in MoE-LLaVA's config (its layer would "
                             f"come back as {theirs!r})")
    for key in ("modality_routing", "last_image_token_as_text", "layer_losses"):
        if getattr(policy, key) != getattr(back, key):
            raise ValueError(f"lm.sparsity.{key}: {getattr(policy, key)!r} has no place in MoE-LLaVA's config")
    return block


def export_moe_llava(model: ZooModel, directory: str | Path) -> Path:
    """Write ``model`` (a zoo LLaVA with a transformers vision tower, an ``mlp`` connector and a Phi or StableLM LM
    sparsified by MoE-LLaVA's policy) in MoE-LLaVA's released layout: ``config.json`` (the LM's config with
    ``model_type`` ``moe_llava_phi`` / ``moe_llava_stablelm``, ``mm_image_tower``, ``image_projector_type``,
    ``mm_vision_select_*`` and the ``moe`` block), ``model.safetensors`` (DeepSpeed-MoE FFN names through
    `zoo.lm.interop.export_moe_llava_state_dict`, the projector under ``model.mm_projector.image_spatial_proj``,
    the tower under ``model.image_tower.image_tower``) and the tokenizer. A tower built from a config (no hub id)
    is saved as a transformers directory ``image_tower/`` that ``mm_image_tower`` names. `from_released` reads the
    result back into the same model."""
    from safetensors.torch import save_file

    from zoo.lm.interop import export_moe_llava_state_dict

    directory = Path(directory)
    vision, connector = model.config.vision, model.config.connector
    if isinstance(vision, list) or vision.kind != "hf" or vision.scales or vision.sparsity is not None:
        raise ValueError("vision: MoE-LLaVA's layout holds one transformers (CLIP / SigLIP) tower without scales or "
                         "sparse blocks")
    if connector.kind != "mlp":
        raise ValueError(f"connector.kind: MoE-LLaVA's projector is an mlp, got {connector.kind!r}")
    family = {v: k for k, v in LM_TYPES.items() if k.startswith("moe_llava")}.get(model.lm.config.model_type)
    if family is None or family == "moe_llava_qwen":
        raise ValueError(f"lm.config.model_type: MoE-LLaVA's layout is exported for phi and stablelm, got "
                         f"{model.lm.config.model_type!r}")
    state = export_moe_llava_state_dict(model.lm)
    state.update({f"{PROJECTOR_PREFIXES['moe-llava'][0]}{k}": v for k, v in model.connector.layers.state_dict().items()})
    tower = getattr(model.vision, "expert", model.vision).model
    state.update({f"{TOWER_PREFIXES['moe-llava'][0]}vision_model.{k}": v for k, v in tower.state_dict().items()})
    directory.mkdir(parents=True, exist_ok=True)
    tower_name = vision.name
    if not (vision.pretrained and vision.name):  # no hub id: save the tower so MoE-LLaVA's code can build it
        tower_dir = directory / "image_tower"  # transformers 4's names (``vision_model.*``), which MoE-LLaVA pins
        model.vision.hf_config.save_pretrained(tower_dir)
        save_file({f"vision_model.{k}": v.detach().contiguous().clone() for k, v in tower.state_dict().items()},
                  str(tower_dir / "model.safetensors"))
        tower_name = str(tower_dir)
    architecture = {"moe_llava_phi": "MoELLaVAPhiForCausalLM", "moe_llava_stablelm": "MoELLaVAStablelmForCausalLM"}
    config = {**model.lm.config.to_dict(), "model_type": family, "architectures": [architecture[family]],
              "mm_image_tower": tower_name, "image_projector_type": connector.projector,
              "mm_hidden_size": model.vision.hf_config.hidden_size,
              "mm_vision_select_layer": vision.feature_layer,
              "mm_vision_select_feature": "patch" if vision.drop_prefix else "cls_patch",
              "image_aspect_ratio": "pad" if vision.resize == "pad" else "square",
              "tokenizer_model_max_length": model.config.max_length, "moe": _moe_block(model)}
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return directory


"""Typed dataclass configs that round-trip YAML/JSON, with strict loading.

Loading is strict: an unknown key is an error naming its full path (``connector.dpeth``) and the closest valid key;
a value of the wrong type names the field and the value. Part names (``kind`` fields) are checked against their
registries when the model is built, and the error lists the registered names.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from zoo.errors import ConfigError
from zoo.registry import Registry, UnknownPartError

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert nested dataclasses; raise ConfigError naming `path`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the most precise
            return _convert(options[0], value, path)
        errors = {}
        for arg in options:
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors[arg] = e
        # a mapping given for a dataclass (or a list for a list) failed inside: its own error is the precise one
        for arg, error in errors.items():
            origin_arg = typing.get_origin(arg)
            if (isinstance(value, dict) and dataclasses.is_dataclass(arg)) or (
                    isinstance(value, list) and origin_arg in (list, tuple)):
                raise error
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r} ({type(value).__name__})")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r} ({type(value).__name__})")
        _key_tp, val_tp = typing.get_args(tp) or (str, Any)
        return {k: _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 2e-5 (no dot in the mantissa) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r} ({type(value).__name__})")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, strictly (see the module docstring)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    expand = getattr(cls, "expand_mapping", None)  # e.g. presets: named defaults merged under the given keys
    if expand is not None:
        data = expand(data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint} Valid keys: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], value, full)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path or cls.__name__}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by a __post_init__ check, which names the field relative to `cls`
        raise ConfigError(f"{path}.{e}" if path else str(e)) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def check_coefficients(coefficients: dict[str, float], field: str = "coefficients") -> None:
    """Aux-loss weights are finite and >= 0 (a negative weight would reward imbalance); errors name the loss."""
    for name, value in coefficients.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{field}.{name}: must be a finite number >= 0, got {value!r}")


def to_dict(obj: Any) -> Any:
    """Plain (JSON/YAML-safe) form of a config dataclass; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def configs_dir() -> Path:
    """Where the shipped configs live (``models/`` the catalogue, ``recipes/``, ``open_clip/`` open_clip model
    configs): ``$ZOO_CONFIGS`` or the repository's ``configs/`` folder."""
    return Path(os.environ.get("ZOO_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader when built in (~10x faster)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file as a mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=YAML_LOADER)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------------
# The model config: one block per part. `kind` names the registered implementation of each part.

# Named vision experts (``vision.expert``): name -> `VisionConfig` fields. `zoo.encoders.named` registers the entries
# (it is imported with `zoo.encoders`, which `zoo` imports), so the config expands a name without importing encoders.
VISION_EXPERTS: Registry[dict[str, Any]] = Registry("vision expert")


@dataclass
class VisionConfig:
    """One vision expert. ``kind``: ``timm`` (any timm model name), ``hf`` (a transformers vision tower) or
    ``open_clip`` (an open_clip model name, ``hf-hub:`` or ``local-dir:``); or ``expert``: a named expert of
    `zoo.encoders.named` (e.g. ``clip-vit-l-14-336``, ``dinov2-vit-l-14-reg4-tiny``) whose fields the others
    override."""

    kind: str = "timm"
    name: str | None = None  # timm model name, or transformers hub id / local dir for `hf`
    pretrained: bool = False  # load the named weights (hub or offline cache); False builds random weights
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs, or a transformers config dict
    feature_layer: int = -2  # index into hidden_states: -2 = penultimate block (LLaVA), -1 = last
    drop_prefix: bool = True  # drop CLS / register tokens
    image_size: int | None = None  # input resolution; None: the model's own
    mean: list[float] | None = None  # normalisation; None: the model's own
    std: list[float] | None = None
    resize: typing.Literal["squash", "pad"] = "squash"  # pad = letterbox with the mean colour (LLaVA-1.5)
    frozen: bool = False
    scales: list[int] | None = None  # S2 multi-scale, e.g. [1, 3] (CuMo: 336 + 1008 cut into 3x3 crops of 336)
    dtype: typing.Literal["float32", "bfloat16", "float16"] | None = None  # e.g. a frozen expert held in bf16
    expert: str | None = None  # a named expert (zoo.encoders.named): its fields are defaults under the given ones
    sparsity: SparsityConfig | None = None  # MoE FFNs in the expert's transformer blocks (CuMo's CLIP-MoE)

    @staticmethod
    def expand_mapping(data: dict[str, Any], path: str) -> dict[str, Any]:
        name = data.get("expert")
        if name is None:
            return data
        try:
            entry = VISION_EXPERTS.get(str(name), field=f"{path}.expert" if path else "expert")
        except UnknownPartError as e:
            raise ConfigError(str(e)) from e
        return {**copy.deepcopy(entry), **data}

    def __post_init__(self):
        if self.scales is not None and (not self.scales or min(self.scales) < 1 or 1 not in self.scales):
            raise ConfigError(f"scales: expected positive integer scales including 1, got {self.scales}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size: must be >= 1 pixel (or null for the model's own), got {self.image_size}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise ConfigError(f"{name}: expected 3 values (R, G, B), got {values}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"std: every value must be > 0, got {self.std}")


@dataclass
class FusionConfig:
    """How several vision experts (``vision`` given as a list) are fused (see `zoo.encoders.fusion`).

    ``mode``: ``channel`` concatenates features per grid position (Prismatic, MoVA; grids must be equal after
    alignment, prefix tokens dropped) or ``sequence`` concatenates the experts' token sequences (MoCHA, MouSi; one
    connector per expert). ``grid``: target side of the aligned grid (channel default: the first expert's grid).
    ``resample``: ``bilinear`` | ``area`` (fp32) | ``none`` (no alignment).
    """

    mode: typing.Literal["channel", "sequence"] = "channel"
    grid: int | None = None
    resample: typing.Literal["bilinear", "area", "none"] = "bilinear"

    def __post_init__(self):
        if self.grid is not None and self.grid < 1:
            raise ConfigError(f"grid: expected a positive grid side, got {self.grid}")


@dataclass
class ConnectorConfig:
    """Vision -> LM bridge. ``kind``: a registered connector (`zoo.connectors.CONNECTORS`), e.g. ``mlp`` (LLaVA
    projector; ``projector``: linear | identity | mlpNx_gelu).

    ``moe``: `zoo.moe.MoEConfig` fields for MoE connectors (widths come from the vision tower and the LM);
    ``coefficients``: weight of each aux loss by name in the model loss (a loss named ``balance.1``, from the
    connector of vision expert 1, takes the coefficient of ``balance``); ``options``: the kind's own settings,
    checked by that connector (errors name ``connector.options.<key>``).
    """

    kind: str = "mlp"
    projector: str = "mlp2x_gelu"
    bias: bool = True
    moe: dict[str, Any] = field(default_factory=dict)
    coefficients: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_coefficients(self.coefficients)
        if self.moe:  # value ranges now (expert counts, top-k, capacities); the kind checks its keys when built
            from zoo.moe.config import MoEConfig

            known = {k: v for k, v in self.moe.items() if k in {f.name for f in dataclasses.fields(MoEConfig)}}
            try:
                from_dict(MoEConfig, known)
            except ConfigError as e:
                raise ConfigError(f"moe.{e}") from e


@dataclass
class TokenizerConfig:
    """`name`: hub id or local dir of a tokenizer; or `train_on`: a corpus to train a word-level tokenizer on."""

    name: str | None = None
    train_on: str | None = None  # e.g. "easy-vqa"
    image_token: str = "<image>"


SPARSITY_PRESETS: dict[str, dict[str, Any]] = {
    # MoE-LLaVA (arXiv 2401.15947): even layers, 4 upcycled experts, top-2 with capacity 1.5 train / 2.0 eval,
    # Switch balance loss on first choices with coefficient 0.01.
    "moe-llava": {
        "layers": "every_other_even", "init": "upcycle",
        "moe": {"num_experts": 4, "top_k": 2, "router": "softmax_topk", "renormalize": True, "capacity_factor": 1.5,
                "eval_capacity_factor": 2.0, "balance_loss": "switch", "z_loss": False},
        "coefficients": {"balance": 0.01},
    },
    # DeepSeekMoE (arXiv 2401.06066): all layers but the first, each FFN split into 4 fine-grained slices, 16 routed
    # experts (raw softmax gates, top-6 here) plus 2 shared slices, expert-level balance.
    "deepseek-moe": {
        "layers": "all_but_first", "init": "fine_grained_split", "granularity": 4,
        "moe": {"num_experts": 16, "top_k": 6, "router": "softmax_topk", "renormalize": False, "num_shared": 2,
                "balance_loss": "deepseek", "z_loss": False},
        "coefficients": {"balance": 0.001},
    },
    # MoIIE (arXiv 2508.09779): odd layers, 4 upcycled experts (1 image-only, 2 shared, 1 text-only), a router per
    # modality, top-2, transformers-style balance per modality with coefficient 0.001; the last image token of each
    # image is routed as text.
    "moiie": {
        "layers": "every_other_odd", "init": "upcycle", "modality_routing": True, "image_only_experts": 1,
        "text_only_experts": 1, "last_image_token_as_text": True,
        "moe": {"num_experts": 4, "top_k": 2, "router": "softmax_topk", "renormalize": True, "balance_loss": "mixtral",
                "z_loss": False},
        "coefficients": {"balance_image": 0.001, "balance_text": 0.001},
    },
    # CuMo (arXiv 2405.05949), for vision towers (CLIP-MoE): every block's MLP upcycled into 4 experts, top-2
    # renormalised, the per-image Switch loss and the router z-loss, each averaged over the layers, weighted 0.1 / 0.01.
    "cumo": {
        "layers": "all", "init": "upcycle", "layer_losses": "mean",
        "moe": {"num_experts": 4, "top_k": 2, "router": "softmax_topk", "renormalize": True,
                "balance_loss": "switch_per_sequence", "z_loss": True},
        "coefficients": {"balance": 0.1, "z_loss": 0.01},
    },
    # BigMac (arXiv 2502.16927): fine-grained experts working at a low width r = d/4 (descend before dispatch,
    # ascend after), random init.
    "bigmac": {
        "layers": "all", "init": "random", "bigmac_ratio": 0.25, "expert_ratio": 0.5,
        "moe": {"num_experts": 16, "top_k": 4, "router": "softmax_topk", "renormalize": True,
                "balance_loss": "deepseek", "z_loss": False},
        "coefficients": {"balance": 0.01},
    },
}


@dataclass
class SparsityConfig:
    """Which LM layers become sparse and how (see `zoo.lm.sparse`). ``preset`` fills every field the mapping does
    not give (``moe`` and ``coefficients`` are merged key by key).

    ``layers``: ``every_other_even`` | ``every_other_odd`` | ``first_half`` | ``second_half`` | ``all`` |
    ``all_but_first`` | a list of layer indices. ``init``: ``upcycle`` (E copies of the dense FFN), ``upcycle_noise``
    (copies + relative noise ``noise``), ``fine_grained_split`` (copies cut into ``granularity`` slices),
    ``random``. ``moe``: `zoo.moe.MoEConfig` fields (widths come from the LM). ``coefficients``: weight of each
    aux loss by name in the model loss. ``modality_routing``: MoIIE layers with a router per modality.
    ``layer_losses``: each aux loss summed (``sum``) or averaged (``mean``) over the sparse layers. The same policy
    sparsifies a vision expert's transformer blocks (``vision.sparsity``; preset ``cumo``).
    """

    preset: str | None = None
    layers: str | list[int] = "every_other_even"
    init: Literal["upcycle", "upcycle_noise", "fine_grained_split", "random"] = "upcycle"
    noise: float = 0.01
    granularity: int = 1
    expert_ratio: float | None = None  # random init: expert width = ratio * dense FFN width (default 1/granularity)
    bigmac_ratio: float | None = None  # BigMac rank = ratio * hidden size
    moe: dict[str, Any] = field(default_factory=dict)
    coefficients: dict[str, float] = field(default_factory=lambda: {"balance": 0.01})
    modality_routing: bool = False
    image_only_experts: int = 1
    text_only_experts: int = 1
    last_image_token_as_text: bool = False
    layer_losses: Literal["sum", "mean"] = "sum"  # aux losses over the sparse layers: MoE-LLaVA sums, CuMo averages

    @staticmethod
    def expand_mapping(data: dict[str, Any], path: str) -> dict[str, Any]:
        name = data.get("preset")
        if name is None:
            return data
        if name not in SPARSITY_PRESETS:
            close = difflib.get_close_matches(str(name), SPARSITY_PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path + '.' if path else ''}preset: unknown sparsity preset {name!r}{hint} "
                              f"Known presets: {', '.join(SPARSITY_PRESETS)}")
        merged = copy.deepcopy(SPARSITY_PRESETS[name])
        for key, value in data.items():
            if key in ("moe", "coefficients") and isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
        return merged

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in SPARSITY_PRESETS:
            raise ConfigError(f"preset: unknown sparsity preset {self.preset!r}; known: {', '.join(SPARSITY_PRESETS)}")
        if isinstance(self.layers, str) and self.layers not in LAYER_RULES:
            raise ConfigError(f"layers: expected one of {', '.join(LAYER_RULES)} or a list of indices, got {self.layers!r}")
        if self.granularity < 1:
            raise ConfigError(f"granularity: must be >= 1, got {self.granularity}")
        if self.init == "fine_grained_split" and self.granularity < 2:
            raise ConfigError("granularity: init fine_grained_split needs granularity >= 2")
        if self.noise < 0:
            raise ConfigError(f"noise: must be >= 0, got {self.noise}")
        for name in ("expert_ratio", "bigmac_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"{name}: must be in (0, 1], got {value}")
        check_coefficients(self.coefficients)
        from zoo.moe.config import MoEConfig

        try:  # field names, types and the width-free checks now; widths come from the LM at build time
            moe = from_dict(MoEConfig, dict(self.moe))
        except ConfigError as e:
            raise ConfigError(f"moe.{e}") from e
        if self.modality_routing and self.image_only_experts + self.text_only_experts >= moe.num_experts:
            raise ConfigError(f"image_only_experts: {self.image_only_experts} image-only + {self.text_only_experts} "
                              f"text-only experts leave no shared expert among {moe.num_experts}")


LAYER_RULES = ("every_other_even", "every_other_odd", "first_half", "second_half", "all", "all_but_first")

LORA_MODES = ("single", "moe", "rank_moe", "task")


@dataclass
class LoRAExpertConfig:
    """LoRA adapters on the LM's linear layers, alone or as routed experts (see `zoo.lm.lora`).

    ``targets``: module-name suffixes of the ``nn.Linear`` layers to wrap (``q_proj`` matches ``...self_attn.q_proj``).
    ``mode``: ``single`` (plain LoRA of rank ``rank``), ``moe`` (MixLoRA / LLaVA-MoLE: ``n_experts`` LoRAs of rank
    ``rank_per_expert``, top-``top_k`` router, or all experts softmax-weighted when ``dense_soft``: LoRAMoE),
    ``rank_moe`` (SMoRA: one LoRA of rank ``total_rank`` whose ranks are experts, ``active_ranks`` per token) or
    ``task`` (MemLoRA: one adapter of rank ``rank`` per name in ``task_names``, chosen by the caller, no router).
    ``gate``: ``softmax`` (renormalised over the chosen experts/ranks when ``renorm``, else the raw probabilities)
    or ``ones`` (chosen experts weigh 1; the router gets no gradient). ``balance``: ``aux`` (Switch loss, weight
    ``aux_coef``), ``bias`` (aux-loss-free selection bias moved by ``bias_gamma`` after each step) or None.
    The LoRA scale is ``alpha / rank`` (``rank_per_expert`` for moe, ``active_ranks`` for rank_moe).
    ``backend``: in a model config, mode ``single`` is peft's LoRA (``peft``, the default) or zoo's own layer
    (``zoo``, whose `zoo.lm.lora.merge_lora` unmerges bitwise); the other modes are always zoo's.

    ``uses_peft`` tells which one a model builds.
    """

    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    mode: Literal["single", "moe", "rank_moe", "task"] = "single"
    rank: int = 8
    n_experts: int = 8
    rank_per_expert: int = 8
    top_k: int = 2
    renorm: bool = True
    dense_soft: bool = False
    total_rank: int = 64
    active_ranks: int = 8
    gate: Literal["softmax", "ones"] = "softmax"
    balance: Literal["aux", "bias"] | None = "aux"
    aux_coef: float = 0.01
    bias_gamma: float = 1e-3
    task_names: list[str] | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    backend: Literal["zoo", "peft"] | None = None  # None: peft for mode single, zoo for the others

    def __post_init__(self) -> None:
        if self.mode not in LORA_MODES:
            raise ConfigError(f"mode: unknown LoRA mode {self.mode!r}; expected one of {', '.join(LORA_MODES)}")
        if not self.targets:
            raise ConfigError("targets: expected at least one module-name suffix, e.g. ['q_proj', 'v_proj']")
        for name in ("rank", "n_experts", "rank_per_expert", "top_k", "total_rank", "active_ranks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.mode == "moe" and self.top_k > self.n_experts:
            raise ConfigError(f"top_k: {self.top_k} > n_experts {self.n_experts}")
        if self.mode == "rank_moe" and self.active_ranks > self.total_rank:
            raise ConfigError(f"active_ranks: {self.active_ranks} > total_rank {self.total_rank}")
        if self.gate not in ("softmax", "ones"):
            raise ConfigError(f"gate: expected 'softmax' or 'ones', got {self.gate!r}")
        if self.balance not in ("aux", "bias", None):
            raise ConfigError(f"balance: expected 'aux', 'bias' or None, got {self.balance!r}")
        if self.mode == "moe" and self.dense_soft and self.balance == "bias":
            raise ConfigError("balance: 'bias' steers top-k selection, but dense_soft selects every expert")
        if self.mode == "task":
            if not self.task_names:
                raise ConfigError("task_names: mode 'task' needs the adapter names, e.g. ['extract', 'update']")
            if len(set(self.task_names)) != len(self.task_names):
                raise ConfigError(f"task_names: duplicate names in {self.task_names}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.backend == "peft" and self.mode != "single":
            raise ConfigError(f"backend: peft gives a plain LoRA (mode 'single'); mode {self.mode!r} is zoo's")
        if self.aux_coef < 0 or self.bias_gamma < 0:
            name = "aux_coef" if self.aux_coef < 0 else "bias_gamma"
            raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")

    @property
    def uses_peft(self) -> bool:
        """Whether a model builds this LoRA with peft (plain LoRA, backend peft or unset)."""
        return self.mode == "single" and self.backend in (None, "peft")


@dataclass
class LMConfig:
    """Language model. `kind`: `hf` (any transformers causal LM, by hub id / dir or by config dict)."""

    kind: str = "hf"
    name: str | None = None  # hub id or local dir
    pretrained: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs incl. model_type
    attn_implementation: str | None = None
    sparsity: SparsityConfig | None = None  # sparse FFN layers by policy (zoo.lm.sparse)
    lora: LoRAExpertConfig | None = None  # LoRA / LoRA experts on the LM's linear layers (zoo.lm.lora)


@dataclass
class TransformersConfig:
    """A transformers-native model (`zoo.families`): the transformers class's own forward, image processor and chat
    template, its sparse blocks swapped for zoo MoE layers.

    ``config``: the transformers config (with ``model_type``, as its ``config.json`` holds it). ``processor``: a hub id
    or directory of the model's processor; None builds a tiny offline one for test twins (a tokenizer trained on
    easy-vqa with the family's special tokens and a chat template in the family's format). ``coefficients``: weight
    of each aux loss by name (None: the config's ``router_aux_loss_coef`` on the balance losses).
    """

    config: dict[str, Any] = field(default_factory=dict)
    processor: str | None = None
    coefficients: dict[str, float] | None = None


@dataclass
class ModelConfig:
    """A whole vision-language model: vision expert(s) -> connector -> language model.

    ``vision`` is one expert or a list of experts fused as ``fusion`` says. ``transformers`` makes it a
    transformers-native model instead (`zoo.families`: Qwen3-VL-MoE, GLM-4.5V, Llama 4, ...): vision, fusion and
    connector then do not apply; ``lm.sparsity`` / ``lm.lora`` act on its language model.
    """

    name: str = "unnamed"
    family: str = "llava"
    description: str = ""
    vision: VisionConfig | list[VisionConfig] = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prompt: str = "<image>\n{question}"  # template for answer(); the answer follows after one space
    max_length: int = 2048
    image_token_id: int | None = None  # filled from the tokenizer when the model is built
    weights: str | None = None  # released weights for zoo.load(name): a zoo checkpoint dir or hub id
    transformers: TransformersConfig | None = None  # a transformers-native model (zoo.families)

    def __post_init__(self) -> None:
        if self.max_length < 2:  # the image tokens' room is checked when the model is built
            raise ConfigError(f"max_length: must be >= 2 (an image and an answer token), got {self.max_length}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Load a model config from YAML or JSON, strictly; errors start with the file name."""
        try:
            return from_dict(cls, read_mapping(path))
        except ConfigError as e:
            if str(e).startswith(str(path)):
                raise
            raise ConfigError(f"{path}: {e}") from e

    @property
    def vision_experts(self) -> list[VisionConfig]:
        """The vision experts as a list (one or several)."""
        return list(self.vision) if isinstance(self.vision, list) else [self.vision]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

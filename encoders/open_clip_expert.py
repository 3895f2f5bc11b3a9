"""Vision experts from open_clip: an image tower by open_clip model name, ``hf-hub:org/repo`` or ``local-dir:/path``.

Only the image tower (``model.visual``) is kept: random towers are built without a text tower, pretrained ones are
loaded through ``open_clip.create_model`` (which does open_clip's checkpoint conversions) and the rest is dropped.

``vision.kwargs`` (all optional):

* ``pretrained_tag``: weights tag of a built-in name (``openai``, ``laion2b_s34b_b82k_augreg_soup``, ...). Its
  preprocessing and QuickGELU flag apply to random towers too, so a random twin has the same architecture.
* ``model_cfg``: an open_clip model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``; a text config is ignored)
  used instead of looking the name up: no file is read, nothing is downloaded. `resolved_config` writes it.
* ``vision_cfg``: keys merged into the tower's ``vision_cfg`` (e.g. ``width``, ``layers``, ``head_width``).
* ``timm_kwargs``: ``timm.create_model`` kwargs of a timm-backed tower's trunk (e.g. ConvNeXt ``depths``, ``dims``).
* ``quick_gelu``: force (or forbid) QuickGELU in a ViT tower; default: the model config's or the tag's flag.

``model_cfg``, ``vision_cfg`` and ``timm_kwargs`` change the architecture and need ``pretrained: false``.
Patch dropout is off (tokens must stay on the grid).

Names: open_clip's built-in model configs, and the zoo's own in ``configs/open_clip/*.json`` (``tiny-byob-clip``: timm's
``test_byobnet`` image tower and a one-layer text tower, the easy-vqa demo's CLIP), registered with open_clip's own
``add_model_config`` (`register_model_configs`), so ``open_clip.create_model`` builds them by name as well.

Towers: open_clip ``VisionTransformer`` towers are read through their own ``forward_intermediates`` (conv1, class
and positional embeddings, ``ln_pre``, the resblocks in their ``batch_first`` layout); ``feature_layer`` counts like
transformers' ``hidden_states`` (-2 = penultimate block) and the CLS token is dropped unless ``drop_prefix`` is false.
Timm-backed towers (``model.visual.trunk``: ConvNeXt, SigLIP, BiomedCLIP's ViT) are a `TimmExpert` over the trunk,
with timm's ``feature_layer`` semantics (ViT blocks, CNN stages). What comes after the feature layer is pruned.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import torch

from zoo.config import VisionConfig, configs_dir

from .base import ENCODERS, VisionExpert, hidden_state_to_block
from .timm_expert import TimmExpert

_REGISTERED: set[Path] = set()


def register_model_configs(folder: str | Path | None = None) -> None:
    """Register the open_clip model configs (JSON) of ``folder`` (default: the zoo's ``configs/open_clip``) with
    open_clip's ``add_model_config``, once per folder and process; afterwards open_clip builds them by name."""
    import open_clip

    folder = Path(folder) if folder is not None else configs_dir() / "open_clip"
    if folder in _REGISTERED or not folder.is_dir():
        return
    open_clip.add_model_config(folder)
    _REGISTERED.add(folder)


_OPTIONS = {"pretrained_tag": str, "model_cfg": dict, "vision_cfg": dict, "timm_kwargs": dict, "quick_gelu": bool}
_ARCHITECTURE_OPTIONS = ("model_cfg", "vision_cfg", "timm_kwargs")


@ENCODERS.register("open_clip")
class OpenClipExpert(VisionExpert):
    """An open_clip image tower (see the module docstring for names and ``vision.kwargs``).

    Attributes: ``model_cfg`` (the resolved ``{embed_dim, quick_gelu, vision_cfg}``), and either ``model`` (an open_clip
    ``VisionTransformer``, pruned) or ``trunk`` (a `TimmExpert` over a timm-backed tower's trunk).
    """

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        import open_clip

        register_model_configs()
        options, schema = _options(config)
        tag = options.get("pretrained_tag")
        tag_cfg = _tag_cfg(open_clip, config.name, tag) if tag else {}
        if "model_cfg" in options:  # resolved configs and tiny twins: no lookup, no download
            source = {"model_cfg": options["model_cfg"]}
        else:
            source = _source(open_clip, config.name, schema)
        self.model_cfg = _architecture(config, options, source["model_cfg"], tag_cfg)
        self.timm_kwargs = dict(options.get("timm_kwargs", {}))
        vision_cfg = self.model_cfg["vision_cfg"]
        if isinstance(vision_cfg.get("layers"), (list, tuple)):
            raise ValueError(f"vision.name: {config.name!r} is an open_clip ResNet tower (ModifiedResNet), which "
                             "has no token interface here; use a ViT or timm-backed tower")
        if self.timm_kwargs and not vision_cfg.get("timm_model_name"):
            raise ValueError(f"vision.kwargs.timm_kwargs: {config.name!r} is not a timm-backed tower; use "
                             "vision.kwargs.vision_cfg")

        visual = _load_pretrained(open_clip, config, tag, self.model_cfg) if config.pretrained else None
        if visual is not None:
            preprocess = visual.preprocess_cfg
        else:
            preprocess = open_clip.transform.merge_preprocess_dict(
                dataclasses.asdict(open_clip.transform.PreprocessCfg()), source.get("preprocess_cfg", {}))
            preprocess = open_clip.transform.merge_preprocess_dict(preprocess, tag_cfg)
        self.image_size = _square(vision_cfg.get("image_size", 224), config.name)
        self.mean = tuple(config.mean or preprocess["mean"])
        self.std = tuple(config.std or preprocess["std"])

        if vision_cfg.get("timm_model_name"):
            self.trunk = TimmExpert(VisionConfig(
                kind="timm", name=vision_cfg["timm_model_name"], kwargs=self.timm_kwargs,
                feature_layer=config.feature_layer, drop_prefix=config.drop_prefix, image_size=self.image_size,
                mean=list(self.mean), std=list(self.std)))
            if visual is not None:
                _load_trunk(self.trunk.model, visual.trunk, config.name)
            self.width, self.grid = self.trunk.width, self.trunk.grid
            self.num_prefix_tokens = self.trunk.num_prefix_tokens
            return

        if visual is None:
            from open_clip.model import _build_vision_tower  # what CLIP.__init__ builds its image tower with

            visual = _build_vision_tower(self.model_cfg["embed_dim"], vision_cfg, self.model_cfg["quick_gelu"])
        self.index = hidden_state_to_block(config.feature_layer, len(visual.transformer.resblocks))
        # Blocks after the feature layer, ln_post, the pooler and the projection never run: dropping them keeps
        # every parameter in the graph (optimizer, DDP) and the parameter count honest.
        visual.prune_intermediate_layers([self.index], prune_norm=True, prune_head=True)
        visual.attn_pool = visual.attn_pool_contrastive = None
        self.model = visual
        self.width = visual.transformer.width
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.num_prefix_tokens = 1  # open_clip ViTs always carry one class token

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "trunk"):
            return self.trunk.forward_tokens(pixel_values)
        keep_prefix = not self.config.drop_prefix
        out = self.model.forward_intermediates(pixel_values, indices=[self.index], stop_early=True,
                                               intermediates_only=True, output_fmt="NLC",
                                               output_extra_tokens=keep_prefix)
        tokens = out["image_intermediates"][0]
        if keep_prefix:
            return torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens

    def resolved_config(self) -> VisionConfig:
        """The base resolved config with ``kwargs.model_cfg`` (and ``timm_kwargs``): rebuilding reads no file and
        downloads nothing."""
        resolved = super().resolved_config()
        resolved.kwargs = {"model_cfg": copy.deepcopy(self.model_cfg)}
        if self.timm_kwargs:
            resolved.kwargs["timm_kwargs"] = copy.deepcopy(self.timm_kwargs)
        return resolved


def _options(config: VisionConfig) -> tuple[dict[str, Any], str | None]:
    """The checked ``vision.kwargs`` and the name's schema (``hf-hub``, ``local-dir`` or None for built-ins)."""
    if not config.name:
        raise ValueError("vision.name: an open_clip model name, hf-hub:org/repo or local-dir:/path is required for "
                         "kind 'open_clip'")
    for key, value in config.kwargs.items():
        if key not in _OPTIONS:
            close = difflib.get_close_matches(key, _OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"vision.kwargs.{key}: unknown open_clip option{hint} Known: {', '.join(_OPTIONS)}")
        if not isinstance(value, _OPTIONS[key]):
            raise ValueError(f"vision.kwargs.{key}: expected {_OPTIONS[key].__name__}, got {value!r}")
    if config.pretrained:
        for key in _ARCHITECTURE_OPTIONS:
            if key in config.kwargs:
                raise ValueError(f"vision.kwargs.{key}: changes the architecture, so it needs vision.pretrained false "
                                 f"(pretrained weights come with their own architecture)")
    schema, _ = _parse_name(config.name)
    if schema and "pretrained_tag" in config.kwargs:
        raise ValueError(f"vision.kwargs.pretrained_tag: {config.name!r} names its weights itself; a tag applies to "
                         f"built-in open_clip names only")
    return dict(config.kwargs), schema


def _parse_name(name: str) -> tuple[str | None, str]:
    from open_clip.factory import parse_model_name

    try:
        return parse_model_name(name)
    except ValueError as e:
        raise ValueError(f"vision.name: {e}") from e


def _tag_cfg(open_clip, name: str, tag: str) -> dict[str, Any]:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "(none)"
        raise ValueError(f"vision.kwargs.pretrained_tag: unknown open_clip tag {tag!r} for {name!r}; known: {known}")
    return cfg


def _source(open_clip, name: str, schema: str | None) -> dict[str, Any]:
    """``{"model_cfg": ..., "preprocess_cfg": ...}`` of a built-in name, a local dir or a hub repo (offline cache)."""
    if schema is None:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            close = difflib.get_close_matches(name, open_clip.list_models(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"vision.name: unknown open_clip model {name!r}{hint} (see open_clip.list_models(), or "
                             "use hf-hub:org/repo or local-dir:/path)")
        return {"model_cfg": model_cfg}
    _, identifier = _parse_name(name)
    try:
        if schema == "local-dir":
            path = Path(identifier) / "open_clip_config.json"
        else:
            from open_clip.pretrained import download_pretrained_from_hf

            path = download_pretrained_from_hf(identifier, filename="open_clip_config.json")
        source = json.loads(Path(path).read_text())
    except Exception as e:  # missing dir/file, not in the offline cache, bad JSON
        raise OSError(f"vision.name: cannot read open_clip_config.json of {name!r} from a local dir or the offline "
                      f"cache: {e}") from e
    if "model_cfg" not in source:
        raise ValueError(f"vision.name: open_clip_config.json of {name!r} has no 'model_cfg'")
    return source


def _architecture(config: VisionConfig, options: dict[str, Any], model_cfg: dict[str, Any],
                  tag_cfg: dict[str, Any]) -> dict[str, Any]:
    if "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise ValueError(f"vision.kwargs.model_cfg: an open_clip model config needs 'embed_dim' and 'vision_cfg', "
                         f"got keys {sorted(model_cfg)}")
    vision_cfg = {**copy.deepcopy(model_cfg["vision_cfg"]), **copy.deepcopy(options.get("vision_cfg", {}))}
    vision_cfg["patch_dropout"] = 0.0
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # the trunk's weights come from the CLIP checkpoint or nowhere
    if config.image_size is not None:
        vision_cfg["image_size"] = config.image_size
    quick_gelu = options.get("quick_gelu", bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu")))
    return {"embed_dim": model_cfg["embed_dim"], "quick_gelu": quick_gelu, "vision_cfg": vision_cfg}


def _load_pretrained(open_clip, config: VisionConfig, tag: str | None, model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The image tower of ``open_clip.create_model`` with the resolved architecture and the named weights."""
    try:
        model = open_clip.create_model(config.name, pretrained=tag, require_pretrained=True,
                                       force_image_size=config.image_size, vision_cfg=model_cfg["vision_cfg"],
                                       quick_gelu=model_cfg["quick_gelu"])
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/ValueError/hub errors
        what = f"{config.name!r}" + (f" with tag {tag!r}" if tag else "")
        raise OSError(f"vision.name: cannot load the open_clip weights of {what} from a local dir or the offline "
                      f"cache: {e}") from e
    return model.visual


def _load_trunk(target: torch.nn.Module, trunk: torch.nn.Module, name: str) -> None:
    missing, _unexpected = target.load_state_dict(trunk.state_dict(), strict=False)  # unexpected: pruned layers
    if missing:
        raise ValueError(f"vision.name: the timm trunk of {name!r} lacks weights for {missing[:5]}")


def _square(size: Any, name: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"vision.image_size: open_clip tower {name!r} is non-square {tuple(size)}; set "
                             "vision.image_size")
        size = size[0]
    return int(size)

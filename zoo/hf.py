"""Small helpers shared by the parts that wrap transformers models."""

from __future__ import annotations

from typing import Any

# Keys that record where a config came from, or classification labels (whose int keys JSON turns into
# strings), not what a vision tower or causal LM builds.
_NON_ARCHITECTURE_KEYS = ("transformers_version", "architectures", "_name_or_path", "id2label", "label2id")


def config_to_dict(hf_config: Any) -> dict[str, Any]:
    """A transformers config as a plain dict that rebuilds the same architecture with ``AutoConfig.for_model``.

    The full dict, not the diff against defaults: defaults may change between transformers releases.
    """
    data = {k: v for k, v in hf_config.to_dict().items() if k not in _NON_ARCHITECTURE_KEYS}
    data["model_type"] = hf_config.model_type
    return data

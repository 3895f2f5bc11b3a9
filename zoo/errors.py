"""Errors about what the user gave, in the lowest layer of the zoo so that every layer can raise them.

`ConfigError` is raised by `zoo.moe` (for `MoEConfig`) as well as by `zoo.config` (for the model configs, which
build on `zoo.moe`'s), so it lives below both; ``from zoo.config import ConfigError`` keeps working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value or key is invalid; the message starts with the full path of the bad field."""

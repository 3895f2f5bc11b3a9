"""Connectors (``zoo.connectors``): the bridges from vision tokens to the language model's embedding space."""

from . import compress, mlp, mocha, moe_mlp, mousi, mova  # noqa: F401  (register the kinds)
from .base import CONNECTORS, ConnectorOutput, PerExpertConnector, build_connector
from .mlp import MLPProjector

__all__ = ["CONNECTORS", "ConnectorOutput", "MLPProjector", "PerExpertConnector", "build_connector"]

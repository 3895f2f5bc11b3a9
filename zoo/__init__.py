"""zoo: assemble, train, evaluate and share sparse vision-language models.

>>> import zoo
>>> zoo.list_models()                      # catalogue names
>>> model = zoo.build("tiny-llava")        # fresh model from a catalogue name or YAML path
>>> model = zoo.load("path/or/hub-id")     # a trained checkpoint
>>> model.answer(images, questions)
>>> zoo.param_counts("moe-llava-phi2-2.7b-4e")  # total / active by part, on the meta device
"""

from zoo.catalogue import build, get_config, list_models, load
from zoo.config import ConfigError, ModelConfig
from zoo.model import ZooModel, ZooOutput
from zoo.params import ParamCounts, param_counts
from zoo.registry import Registry, UnknownPartError

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "ModelConfig", "ParamCounts", "Registry", "UnknownPartError", "ZooModel", "ZooOutput",
    "build", "get_config", "list_models", "load", "param_counts",
]

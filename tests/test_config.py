"""Registry and strict config loading; every shipped YAML round-trips."""

from pathlib import Path

import pytest
import yaml

import zoo
from zoo.config import ConfigError, ModelConfig, from_dict, to_dict
from zoo.registry import Registry, UnknownPartError

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "models").glob("*.yaml"))
RECIPES = sorted((Path(__file__).parent.parent / "configs" / "recipes").glob("*.yaml"))


def test_registry_lists_known_names_and_closest():
    reg = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    assert reg.get("beta") == 2
    with pytest.raises(UnknownPartError) as e:
        reg.get("alpah", field="part.kind")
    msg = str(e.value)
    assert msg.startswith("part.kind: unknown widget 'alpah'")
    assert "did you mean 'alpha'" in msg and "alpha, beta" in msg
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 3)


def test_unknown_key_names_full_path_and_closest_key():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({"connector": {"kind": "mlp", "projecter": "linear"}})
    assert "unknown key 'connector.projecter'" in str(e.value)
    assert "did you mean 'connector.projector'" in str(e.value)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"connector\.bias: expected bool, got 'yes' \(str\)"):
        ModelConfig.from_dict({"connector": {"bias": "yes"}})
    with pytest.raises(ConfigError, match=r"vision\.mean\[1\]: expected float, got 'x'"):
        ModelConfig.from_dict({"vision": {"mean": [0.5, "x", 0.5]}})
    with pytest.raises(ConfigError, match=r"vision\.resize: expected one of 'squash', 'pad', got 'crop'"):
        ModelConfig.from_dict({"vision": {"resize": "crop"}})
    with pytest.raises(ConfigError, match=r"max_length: expected int, got True"):
        ModelConfig.from_dict({"max_length": True})


def test_unknown_part_name_lists_registered(tmp_path):
    config = zoo.get_config("tiny-llava")
    config.connector.kind = "mpl"
    with pytest.raises(UnknownPartError, match=r"connector\.kind: unknown connector 'mpl'.*Registered connectors: .*\bmlp\b"):
        zoo.build(config)


def test_typo_in_a_yaml_file_names_file_path_and_key(tmp_path):
    data = yaml.safe_load((Path(__file__).parent.parent / "configs/models/tiny-llava.yaml").read_text())
    data["vision"]["feature_layr"] = -2
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        zoo.get_config(path)
    assert str(path) in str(e.value) and "'vision.feature_layr'" in str(e.value)
    assert "'vision.feature_layer'" in str(e.value)


def test_configs_folder_holds_only_models_and_recipes():
    root = Path(__file__).parent.parent / "configs"
    assert sorted(root.rglob("*.yaml")) == sorted(CONFIGS + RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_round_trips(path):
    from zoo.train.recipe import RecipeConfig, load_recipe

    recipe = load_recipe(path)
    assert from_dict(RecipeConfig, to_dict(recipe)) == recipe
    assert zoo.get_config(recipe.model).name  # names a catalogue entry


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_round_trips(path):
    config = ModelConfig.from_file(path)
    again = ModelConfig.from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert from_dict(ModelConfig, config.to_dict()).to_dict() == config.to_dict()


def test_catalogue_lists_every_model_file():
    names = zoo.list_models()
    assert {"tiny-llava", "llava-1.5-7b"} <= set(names)
    assert names == sorted(p.stem for p in (Path(__file__).parent.parent / "configs/models").glob("*.yaml"))
    assert zoo.list_models(family="llava") == [n for n in names if zoo.get_config(n).family == "llava"]

"""The frozen-feature cache (zoo.encoders.cache): bitwise the live features, keyed by content and tower, crash-safe
shards, and align-stage training that reads features instead of running the experts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import zoo
from zoo.config import FusionConfig, VisionConfig, from_dict
from zoo.encoders import FeatureCache, FusedVision, image_key, tower_fingerprint


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


@pytest.fixture(scope="module")
def frozen_model():
    config = tiny_config()
    config.vision.frozen = True
    torch.manual_seed(0)
    return zoo.build(config)


def test_cached_features_are_bitwise_the_live_ones(frozen_model, tmp_path):
    images = _images(10)
    cache = FeatureCache(tmp_path, frozen_model.vision, shard_size=4)  # 3 shards
    assert cache.add(images, batch_size=10) == 10
    with torch.no_grad():
        live = frozen_model.vision(frozen_model.vision.preprocess(images))
    assert torch.equal(cache.get(images), live)
    assert torch.equal(cache.get(images[::-1]), live.flip(0))
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 3


def test_entries_are_keyed_by_content_and_tower(frozen_model, tmp_path):
    images = _images(3)
    cache = FeatureCache(tmp_path, frozen_model.vision)
    cache.add(images)
    copy = images[0].copy()
    assert copy is not images[0] and copy in cache and image_key(copy) == image_key(images[0])
    changed = images[0].copy()
    changed.putpixel((0, 0), (0, 0, 0) if changed.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert changed not in cache
    with pytest.raises(KeyError, match=r"image 1: not in the feature cache"):
        cache.get([images[0], changed])
    assert cache.add(images + [copy]) == 0  # nothing new
    # a new object on the same folder reads the index back; other weights live in another folder
    assert len(FeatureCache(tmp_path, frozen_model.vision)) == 3
    other = zoo.build(tiny_config()).vision
    assert tower_fingerprint(other) != cache.fingerprint
    assert len(FeatureCache(tmp_path, other)) == 0


def test_a_crash_never_leaves_a_readable_half_shard(frozen_model, tmp_path):
    images = _images(4)
    cache = FeatureCache(tmp_path, frozen_model.vision, shard_size=2)
    cache.add(images[:2])
    (cache.dir / "shard-00001.tmp").write_bytes(b"half a shard")  # a write interrupted before its rename
    again = FeatureCache(tmp_path, frozen_model.vision, shard_size=2)
    assert len(again) == 2 and images[2] not in again
    assert again.add(images) == 2 and torch.equal(again.get(images[:2]), cache.get(images[:2]))
    shard = again.dir / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])  # a truncated file on disk is named in the error
    with pytest.raises(ValueError, match="shard-00001.safetensors: cannot read cached features"):
        FeatureCache(tmp_path, frozen_model.vision).get(images[2:])


def test_sequence_fused_tower_caches_each_expert(tmp_path):
    experts = [from_dict(VisionConfig, {"kind": "timm", "name": "convnext_atto", "image_size": 64, "frozen": True,
                                        "kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 40]}}),
               from_dict(VisionConfig, {"kind": "timm", "name": "vit_large_patch14_reg4_dinov2", "image_size": 42,
                                        "frozen": True, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}})]
    torch.manual_seed(0)
    tower = FusedVision(experts, FusionConfig(mode="sequence")).eval()
    images = _images(3)
    cache = FeatureCache(tmp_path, tower)
    cache.add(images)
    with torch.no_grad():
        live = tower(tower.preprocess(images))
    cached = cache.get(images)
    assert isinstance(cached, list) and len(cached) == 2
    assert all(torch.equal(c, t) for c, t in zip(cached, live))


def test_align_stage_reads_features_and_matches_live_training(frozen_model, easy_vqa, tmp_path):
    from zoo.train import TrainConfig, VQATrainingSet, fit

    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:128])
    cache = FeatureCache(tmp_path, frozen_model.vision)
    cached = VQATrainingSet(frozen_model, split, features=cache)
    live = VQATrainingSet(frozen_model, split)
    items = [cached[i] for i in range(16)]
    a, b = cached.collate(items), live.collate(items)
    assert "pixel_values" not in a and "image_features" in a
    with torch.no_grad():
        torch.testing.assert_close(frozen_model(**a).loss, frozen_model(**b).loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pixel_values and image_features"):
        frozen_model(**a, pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match="augment: cached features"):
        VQATrainingSet(frozen_model, split, features=cache, augment="dihedral")
    # a short align stage on features: the connector learns, the (unused) vision tower is untouched
    model = zoo.build(tiny_config())
    model.load_state_dict(frozen_model.state_dict())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("connector."))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss0 = model(**a).loss.item()
    fit(model, VQATrainingSet(model, split, features=FeatureCache(tmp_path, model.vision)),
        TrainConfig(steps=5, batch_size=16, lr=3e-3), progress=False)
    with torch.no_grad():
        assert model.eval()(**a).loss.item() < loss0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("connector."))
    assert not torch.equal(before["connector.layers.0.weight"], after["connector.layers.0.weight"])


def test_a_stream_keeps_image_keys_only_while_the_image_is_the_same(frozen_model, tmp_path):
    """ConversationStream computes an image's cache key once per file (while its size and mtime stay) or per PIL
    object; every item still carries that image's own live features, and a rewritten file is read again."""
    import os

    from zoo.train.conversations import Conversation, ConversationStream

    a, b, c = _images(3, seed=1)
    path = tmp_path / "img.png"
    a.save(path)
    samples = [Conversation(f"s{i}", [("user", "what?"), ("assistant", "red")], [im])
               for i, im in enumerate([str(path), b, str(path), b])]
    cache = FeatureCache(tmp_path / "cache", frozen_model.vision)
    stream = ConversationStream(frozen_model, [samples], template="zoo", features=cache)
    with torch.no_grad():
        live = frozen_model.vision(frozen_model.vision.preprocess([a, b, c]))
    items = list(stream)
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5)  # noqa: E731 (encoded one by one vs 3 together)
    for item, want in zip(items, [0, 1, 0, 1]):
        assert same(item[3][0], live[want]) and not same(item[3][0], live[1 - want])
    assert len(stream._image_keys) == 2 and len(stream._encoded) == 1
    c.save(path)  # a different picture under the same name: its size or modification time differs
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    items = list(stream)
    assert same(items[0][3][0], live[2]) and same(items[1][3][0], live[1])

"""Conversation data (zoo.train.conversations): templates with labels on assistant turns only, LLaVA JSON and
webdataset sources written by the tests, every kind of bad data as a counted skip, text-only samples in image batches,
and training on the stream."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from image_faults import UNUSABLE, png, write_unusable
from PIL import Image

import zoo
from zoo.cli import main
from zoo.model import IGNORE_INDEX
from zoo.train.conversations import (
    BadSample,
    Conversation,
    ConversationStream,
    encode_conversation,
    parse_llava_record,
    read_llava_json,
    read_webdataset,
)
from zoo.train.data import SkipCounter


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.build(tiny_config())


def _png(colour=(200, 30, 30)) -> bytes:
    return png(colour=colour)


def _supervised(encoded) -> list[int]:
    return [t for t, lab in zip(encoded.input_ids, encoded.labels) if lab != IGNORE_INDEX]


def test_vicuna_template_supervises_only_the_answers(model):
    tok = model.tokenizer
    conv = Conversation("s1", [("user", "<image>\nwhat color is the shape?"), ("assistant", "red"),
                               ("user", "is there a circle?"), ("assistant", "no")], [_png()])
    enc = encode_conversation(model, conv, "vicuna_v1")
    assert _supervised(enc) == tok(" red", add_special_tokens=False).input_ids + [tok.eos_token_id] + \
        tok(" no", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert enc.input_ids.count(model.image_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    unsupervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX]
    assert tok.get_vocab()["circle"] in unsupervised  # the second question is context, not a target


def test_plain_and_zoo_templates(model):
    tok = model.tokenizer
    conv = Conversation("s2", [("user", "<image>\ndescribe it"), ("assistant", "a red circle")], [_png()])
    plain = encode_conversation(model, conv, "plain")
    assert plain.input_ids[:2] == [tok.bos_token_id, model.image_token_id]
    assert _supervised(plain) == tok("a red circle", add_special_tokens=False).input_ids + [tok.eos_token_id]
    zoo_enc = encode_conversation(model, conv, "zoo")
    assert zoo_enc.input_ids[:len(model.encode_prompt("describe it"))] == model.encode_prompt("describe it")
    assert _supervised(zoo_enc) == model.encode_answer("a red circle")


def test_chat_template_labels_each_assistant_message(model):
    tok = model.tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    try:
        conv = Conversation("s3", [("user", "<image>\nwhat shape is this?"), ("assistant", "circle"),
                                   ("user", "what color?"), ("assistant", "red")], [_png()])
        enc = encode_conversation(model, conv, "chat_template")
    finally:
        tok.chat_template = None
    vocab = tok.get_vocab()
    # each supervised span is the message and its closing </s> (the role header belongs to the prompt)
    assert _supervised(enc) == [vocab["circle"], tok.eos_token_id, vocab["red"], tok.eos_token_id]


def test_one_image_without_placeholder_goes_in_front_like_llava(model):
    conv = Conversation("s4", [("user", "what shape is this?"), ("assistant", "circle")], [_png()])
    enc = encode_conversation(model, conv)
    assert enc.input_ids.count(model.image_token_id) == 1


@pytest.mark.parametrize("turns, images, reason", [
    ([("user", "<image>\nwhat shape?")], 1, "no assistant turn"),
    ([("user", "<image>\n  "), ("assistant", "circle")], 1, "empty question"),
    ([("user", "<image> <image> what?"), ("assistant", "circle")], 1, "2 <image> placeholder(s) for 1 image(s)"),
    ([("user", "what?"), ("assistant", "circle")], 2, "0 <image> placeholder(s) for 2 image(s)"),
    ([("user", "<image>\n" + "what " * 300), ("assistant", "circle")], 1, "over-long"),
])
def test_bad_conversations_say_why(model, turns, images, reason):
    with pytest.raises(BadSample, match=reason.replace("(", r"\(").replace(")", r"\)")):
        encode_conversation(model, Conversation("bad", turns, [_png()] * images))


def _write_faulty_llava_json(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.png").write_bytes(_png())
    (images / "blue.png").write_bytes(_png((20, 20, 220)))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    good = [
        {"id": "good-1", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "red"}]},
        {"id": "good-2", "image": "blue.png", "conversations": [
            {"from": "human", "value": "what color is the shape?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "good-text", "conversations": [
            {"from": "human", "value": "is red a color?"}, {"from": "gpt", "value": "yes"}]},
    ]
    unusable = write_unusable(images)  # 1x1, 0 bytes, decompression bombs, 16-bit pixels
    (tmp_path / "outside.png").write_bytes(_png())  # a good image outside the image root
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    bad = [
        {"id": "bad-missing-file", "image": "nowhere.png", "conversations": good[0]["conversations"]},
        {"id": "bad-corrupt", "image": "corrupt.png", "conversations": good[0]["conversations"]},
        *({"id": f"bad-{kind}", "image": path.name, "conversations": good[0]["conversations"]}
          for kind, (path, _) in unusable.items()),
        *({"id": f"bad-escape-{kind}", "image": name, "conversations": good[0]["conversations"]}
          for kind, name in ESCAPES.items()),
        {"id": "bad-no-answer", "image": "red.png", "conversations": [good[0]["conversations"][0]]},
        {"id": "bad-empty-question", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}]},
        {"id": "bad-placeholders", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image> <image> what?"}, {"from": "gpt", "value": "red"}]},
        {"id": "bad-long", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\n" + "what " * 300}, {"from": "gpt", "value": "red"}]},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}]},
    ]
    lines = [json.dumps(r) for r in good + bad] + ["{not json"]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, images, {r["id"] for r in good}, {r["id"] for r in bad} | {f"data.jsonl:{len(lines)}"}


# image paths that leave the image root: parent folders, an absolute path elsewhere, a symlink pointing out
ESCAPES = {"dotdot": "../outside.png", "absolute": "/etc/hostname", "symlink": "link.png"}
# the reason words of every fault of a LLaVA JSON file
JSON_FAULTS = ("malformed JSON line", "unknown role", "missing image file", "corrupt image", "no assistant turn",
               "empty question", "placeholder", "over-long", "outside the image root",
               *(words for _, words in UNUSABLE.values()))


def _drain(stream):
    return [item for item in stream]


def test_llava_json_with_every_fault_trains_on_the_good_samples_only(model, tmp_path):
    path, images, good, bad = _write_faulty_llava_json(tmp_path)
    skipped = SkipCounter()
    samples = read_llava_json(path, image_root=images, skipped=skipped)
    stream = ConversationStream(model, [samples])
    items = _drain(stream)
    assert {i[0] for i in items} == good  # no good sample lost
    named = {sid for ids in list(skipped.by_reason.values()) + list(stream.skipped.by_reason.values()) for sid in ids}
    assert named == bad  # every bad sample named
    reasons = " | ".join(list(skipped.by_reason) + list(stream.skipped.by_reason))
    for word in JSON_FAULTS:
        assert word in reasons, word
    for kind, (_, words) in UNUSABLE.items():  # each reason names the file
        assert any(words in r and f"{kind}.png" in r for r in reasons.split(" | ")), kind
    for kind, name in ESCAPES.items():
        assert any("outside the image root" in r and f"image {name}:" in r for r in reasons.split(" | ")), kind


def _ask(sample_id: str, image: str) -> dict:
    return {"id": sample_id, "image": image, "conversations": [{"from": "human", "value": "<image>\nwhat color?"},
                                                               {"from": "gpt", "value": "red"}]}


def test_image_paths_outside_the_root_are_read_only_when_allowed(model, tmp_path):
    path, images, _, _ = _write_faulty_llava_json(tmp_path)
    samples = read_llava_json(path, image_root=images, skipped=SkipCounter(), allow_outside_root=True)
    escaped = {s.id: s for s in samples if s.id.startswith("bad-escape")}
    assert set(escaped) == {f"bad-escape-{kind}" for kind in ESCAPES}
    assert escaped["bad-escape-absolute"].images == [Path("/etc/hostname")]
    stream = ConversationStream(model, [[escaped["bad-escape-dotdot"], escaped["bad-escape-symlink"]]])
    assert {item[0] for item in stream} == {"bad-escape-dotdot", "bad-escape-symlink"}  # outside.png, both ways
    with pytest.raises(BadSample, match=r"image \.\./outside\.png: a path outside the image root"):
        parse_llava_record(_ask("x", "../outside.png"), image_root=images)
    with pytest.raises(BadSample, match=r"image link\.png: a symlink pointing outside the image root"):
        parse_llava_record(_ask("y", "link.png"), image_root=images)
    assert parse_llava_record(_ask("z", "red.png"), image_root=images).images == [images / "red.png"]


def test_webdataset_round_trip_and_a_truncated_shard(model, tmp_path):
    path, images, good, _ = _write_faulty_llava_json(tmp_path)
    assert main(["convert", "llava-to-wds", str(path), "--image-root", str(images),
                 "--out", str(tmp_path / "wds" / "shard-%05d.tar"), "--maxcount", "4"]) == 0
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("shard-*.tar"))
    # 7 records written: the good ones and those whose fault shows when they are encoded; bad lines, bad roles and
    # unusable or escaping images are skipped on the way
    assert len(shards) == 2
    skipped = SkipCounter()
    samples = list(read_webdataset(shards, skipped=skipped))
    assert len(samples) == 7 and skipped.total == 0
    stream = ConversationStream(model, [lambda: read_webdataset(shards)])
    assert {i[0] for i in _drain(stream)} == good
    # a shard cut in the middle of a member: the readable samples still come, the rest is a counted skip
    data = (tmp_path / "wds" / "shard-00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    skipped = SkipCounter()
    partial = list(read_webdataset([str(cut), shards[1]], skipped=skipped))
    assert skipped.total >= 1 and 3 <= len(partial) < 7  # shard 1's three samples, part of shard 0's


def test_text_only_and_image_samples_share_a_batch_and_training_lowers_the_loss(model, tmp_path):
    from zoo.train import TrainConfig, fit

    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    samples = []
    for i in range(48):
        name = list(colours)[i % 3]
        samples.append(Conversation(f"img-{i}", [("user", "<image>\nwhat color is the shape?"),
                                                 ("assistant", name)], [_png(colours[name])]))
    text = [Conversation(f"txt-{i}", [("user", "is red a color?"), ("assistant", "yes")]) for i in range(16)]
    trained = zoo.build(tiny_config())
    trained.load_state_dict(model.state_dict())
    stream = ConversationStream(trained, [samples, text], template="zoo")
    batch = stream.collate(_drain(stream)[:16])
    assert batch["pixel_values"].shape[0] == int((batch["input_ids"] == trained.image_token_id).sum())
    with torch.no_grad():
        before = trained(**batch).loss.item()
    fit(trained, stream, TrainConfig(steps=8, batch_size=16, lr=3e-3), progress=False)
    with torch.no_grad():
        after = trained.eval()(**batch).loss.item()
    assert after < before


def _write_faulty_shard(tmp_path):
    """One webdataset shard with three good samples, one of each fault a shard can hold, and a last sample cut in
    the middle of its image (a truncated shard)."""
    import tarfile

    import webdataset as wds

    def record(sample_id, turns, images=()):
        return {"json": json.dumps({"id": sample_id, "conversations": [
            {"from": r, "value": t} for r, t in turns]}).encode(), **{f"{i}.img": im for i, im in enumerate(images)}}

    ask = "<image>\nwhat color is the shape?"
    good = {"w-good-red": record("w-good-red", [("human", ask), ("gpt", "red")], [_png()]),
            "w-good-blue": record("w-good-blue", [("human", ask), ("gpt", "blue")], [_png((20, 20, 220))]),
            "w-good-text": record("w-good-text", [("human", "is red a color?"), ("gpt", "yes")])}
    bad = {"w-bad-corrupt": record("w-bad-corrupt", [("human", ask), ("gpt", "red")], [b"\x89PNG\r\n\x1a\n junk"]),
           "w-bad-no-answer": record("w-bad-no-answer", [("human", ask)], [_png()]),
           "w-bad-empty": record("w-bad-empty", [("human", "<image>"), ("gpt", "red")], [_png()]),
           "w-bad-no-image": record("w-bad-no-image", [("human", ask), ("gpt", "red")]),
           "w-bad-long": record("w-bad-long", [("human", ask + " why" * 300), ("gpt", "red")], [_png()])}
    path = tmp_path / "faulty-00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for n, (_, fields) in enumerate([*good.items(), *bad.items()]):
            sink.write({"__key__": f"{n:06d}", **fields})
        sink.write({"__key__": "000098", "json": b"{not json"})  # a malformed JSON record
        noise = Image.frombytes("RGB", (256, 256), bytes(range(256)) * 768)
        buffer = io.BytesIO()
        noise.save(buffer, format="PNG")
        sink.write({"__key__": "000099", **record("w-cut", [("human", ask), ("gpt", "red")], [buffer.getvalue()])})
    with tarfile.open(path) as tar:
        victim = next(m for m in tar.getmembers() if m.name.startswith("000099") and m.name.endswith(".img"))
    data = path.read_bytes()
    path.write_bytes(data[: victim.offset_data + victim.size // 2])
    named_bad = set(bad) | {f"{path}:000098", str(path)}  # the malformed record by key, the cut by shard
    return path, set(good), named_bad


def test_a_json_file_and_a_shard_with_every_fault_train_to_completion(tmp_path):
    """Every fault kind, in a LLaVA JSON file and in a webdataset shard: a recipe trains to the end, the skip
    counters name every bad sample, and exactly the good samples are trained on (counted over one epoch)."""
    from zoo.config import from_dict
    from zoo.train.recipe import RecipeConfig, build_source, run_recipe

    json_path, images, json_good, json_bad = _write_faulty_llava_json(tmp_path)
    shard, shard_good, shard_bad = _write_faulty_shard(tmp_path)
    recipe = from_dict(RecipeConfig, {
        "name": "faulty", "model": "tiny-llava",
        "data": {"json": {"kind": "llava-json", "path": str(json_path), "image_root": str(images)},
                 "shard": {"kind": "webdataset", "urls": [str(shard)]}},
        "stages": [{"name": "instruct", "trainable": ["connector", "lm"], "template": "zoo",
                    "train": {"steps": 4, "batch_size": 4, "lr": 1.0e-3}}]})
    run_recipe(recipe, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stages"]["instruct"]["steps"] == 4  # trained to completion
    named = {i for ids in json.loads((tmp_path / "run" / "00-instruct" / "skipped.json").read_text()).values()
             for i in ids}
    assert named == json_bad | shard_bad
    reasons = " | ".join(json.loads((tmp_path / "run" / "00-instruct" / "skipped.json").read_text()))
    for word in ("malformed JSON line", "malformed JSON record", "unreadable shard data", "missing image file",
                 "corrupt image", "no assistant turn", "empty question", "placeholder", "over-long"):
        assert word in reasons, word
    # one epoch over both sources: every good sample comes out once, nothing else
    model = zoo.build("tiny-llava")
    skipped = SkipCounter()
    sources = [build_source(recipe.data[name], skipped) for name in ("json", "shard")]
    stream = ConversationStream(model, sources, template="zoo")
    ids = [item[0] for item in stream]
    assert sorted(ids) == sorted(json_good | shard_good) and len(ids) == 6

"""The server's model pool and batching engine in-process: the picker's choices, what loads, and that a batch of
mixed requests streams each one the text `ZooModel.generate` gives it alone."""

from __future__ import annotations

import asyncio
import queue

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import zoo
from zoo.generation import sampling_config
from zoo.serve.api import EventRelay
from zoo.serve.engine import Engine
from zoo.serve.models import ModelPool, local_checkpoints, model_choices


def test_picker_lists_local_checkpoints_then_the_catalogue(tmp_path):
    for run in ("demo/model", "recipe/01-instruct/model", "broken/model"):
        (tmp_path / "runs" / run).mkdir(parents=True)
    for run in ("demo/model", "recipe/01-instruct/model"):
        (tmp_path / "runs" / run / "config.json").write_text("{}")
    found = [str(tmp_path / "runs" / r) for r in ("demo/model", "recipe/01-instruct/model")]
    assert local_checkpoints(tmp_path / "runs") == found
    choices = model_choices(tmp_path / "runs")
    assert choices[:2] == found and choices[2:] == zoo.list_models()


def test_pool_builds_small_untrained_entries_and_refuses_large_ones():
    pool = ModelPool(max_fresh_params=5_000_000)
    with pytest.raises(ValueError, match=r"mocha-phi2: the catalogue entry names no released weights, and at "
                                         r"[\d,]+ parameters it is too large"):
        pool.get("mocha-phi2")
    with pytest.raises(OSError, match="llava-hf/llava-1.5-7b-hf"):  # released weights: loaded, here from no cache
        pool.get("llava-1.5-7b")
    engine = pool.get("tiny-llava")
    assert pool.names() == ["tiny-llava"] and pool.untrained == {"tiny-llava"} and pool.get("tiny-llava") is engine
    with pytest.raises(Exception, match="no-such-model"):
        pool.get("no-such-model")
    pool.close()


def test_engine_batches_mixed_requests_and_streams_each_its_own_answer():
    torch.manual_seed(0)
    model = zoo.build(tiny_config()).eval()
    engine = Engine(model, max_batch=4, wait=0.5)
    images = [Image.new("RGB", (64, 64), colour) for colour in ((200, 0, 0), (0, 0, 200), (0, 150, 0))]
    questions = ["what color is it?", "is there a circle in the image?", "what shape?"]
    configs = [sampling_config(0.0, max_new_tokens=5), sampling_config(1.0, max_new_tokens=3),
               sampling_config(0.0, max_new_tokens=4, repetition_penalty=1.5)]
    seeds = [None, 5, None]
    events = [queue.Queue() for _ in questions]
    for question, image, config, seed, sink in zip(questions, images, configs, seeds, events):
        engine.submit(model.encode_prompt(question), image, config, seed, sink.put)
    results = []
    for sink in events:
        pieces = []
        while (event := sink.get(timeout=300))[0] == "text":
            pieces.append(event[1])
        assert event[0] == "done"
        results.append(("".join(pieces), event[1]))
    assert engine.batch_sizes == [3]  # the three waited for each other
    for (streamed, done), question, image, config, seed in zip(results, questions, images, configs, seeds):
        ids, mask = model.collate_prompts([model.encode_prompt(question)])
        alone = model.generate(model.vision.preprocess([image]), ids, mask, generation_config=config, seed=seed)[0]
        eos = model.tokenizer.eos_token_id
        kept = alone.tolist()[: alone.tolist().index(eos)] if eos in alone.tolist() else alone.tolist()
        assert streamed == done.text == model.tokenizer.decode(kept, skip_special_tokens=True).strip()
        assert done.completion_tokens == min(len(kept) + (eos in alone.tolist()), config.max_new_tokens)
        assert done.finish_reason == ("stop" if eos in alone.tolist() else "length")
        assert done.prompt_tokens == len(ids[0]) - 1 + model.num_image_tokens
    assert engine.call(lambda m: m is model).result(timeout=60)
    engine.close()


def test_relayed_events_reach_each_request_token_by_token_as_the_engine_sent_them():
    torch.manual_seed(0)
    model = zoo.build(tiny_config()).eval()  # untrained: answers of several tokens
    engine = Engine(model, max_batch=4, wait=0.5)
    images = [Image.new("RGB", (64, 64), colour) for colour in ((200, 0, 0), (0, 0, 200), (0, 150, 0))]
    questions = ["what color is it?", "is there a circle in the image?", "what shape?"]

    def submit_all(sinks):
        for question, image, sink in zip(questions, images, sinks):
            engine.submit(model.encode_prompt(question), image, sampling_config(max_new_tokens=5), None, sink)

    direct = [queue.Queue() for _ in questions]  # the engine's own events, one batch
    submit_all([q.put for q in direct])
    expected = []
    for q in direct:
        expected.append([q.get(timeout=300)])
        while expected[-1][-1][0] == "text":
            expected[-1].append(q.get(timeout=300))

    async def relayed():
        relay = EventRelay(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in questions]
        submit_all([relay.sink(q) for q in queues])  # the same batch, its events handed over in bursts
        got = []
        for q in queues:
            got.append([await asyncio.wait_for(q.get(), 300)])
            while got[-1][-1][0] == "text":
                got[-1].append(await asyncio.wait_for(q.get(), 300))
        return got

    got = asyncio.run(relayed())
    assert [[(kind, str(value)) for kind, value in events] for events in got] == \
        [[(kind, str(value)) for kind, value in events] for events in expected]
    assert max(sum(kind == "text" for kind, _ in events) for events in got) > 1  # several pieces, one at a time
    assert engine.batch_sizes == [3, 3]
    engine.close()


def test_a_changed_local_export_is_refused_and_no_model_is_one_line(tmp_path, monkeypatch, capsys):
    from zoo.checkpoint import CheckpointError
    from zoo.cli import main

    torch.manual_seed(0)
    path = zoo.build(tiny_config()).save_pretrained(tmp_path / "model")
    pool = ModelPool()
    assert pool.get(str(path)).model.num_image_tokens == 16  # checksums match: served
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ModelPool().get(str(path))
    pool.close()
    monkeypatch.chdir(tmp_path)  # no runs/demo/model here
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == ("zoo serve: error: give MODEL (a checkpoint dir, hub id or catalogue "
                                               "name); runs/demo/model, the default, does not exist yet (make demo "
                                               "writes it)")

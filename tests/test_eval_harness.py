"""The evaluation harness on a short-trained tiny model: batch-size invariance, results files, resume after a
SIGKILL, distributed sharding with two gloo processes, `zoo eval` against the demo, the training callback."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_eval_data import write_fixture

import zoo
from zoo.eval import evaluate, evaluate_benchmark, get_benchmark, shard
from zoo.eval.easy_vqa import EasyVQA

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def checkpoint(trained_model, tmp_path_factory):
    """The session's short-trained tiny-llava, saved (subprocesses load it)."""
    path = tmp_path_factory.mktemp("eval-model") / "model"
    trained_model["model"].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    for name in ("pope", "mmbench", "scienceqa-img"):
        write_fixture(name, root)
    return root


def _without_time(value):
    """A results document without its wall-clock fields (``time``, ``timing``)."""
    if isinstance(value, dict):
        return {k: _without_time(v) for k, v in value.items() if k not in ("time", "timing")}
    if isinstance(value, list):
        return [_without_time(v) for v in value]
    return value


def test_predictions_do_not_depend_on_the_batch_size(trained_model, data):
    model = trained_model["model"]
    for bench, limit in ((EasyVQA(), 40), (get_benchmark("mmbench", data), None)):
        runs = [evaluate_benchmark(model, bench, batch_size=size, limit=limit, max_new_tokens=6) for size in (1, 32)]
        assert runs[0].outputs == runs[1].outputs
        assert runs[0].scores == runs[1].scores
    assert len(set(runs[0].outputs)) > 1 or runs[0].outputs[0]  # the model does answer (not all empty)


def test_results_files_record_every_setting_and_rerun_generates_nothing(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    results = evaluate(str(checkpoint), "easy-vqa,pope", data=data, out_dir=out, batch_size=8, limit=24,
                       max_new_tokens=5, progress=False)
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["model"]["weights_sha256"] == zoo.eval.harness.weights_sha256(zoo.load(checkpoint))
    assert written["model"]["prompt_template"] == "<image>\n{question}" and written["model"]["source"] == str(checkpoint)
    assert written["packages"]["torch"] and written["packages"]["transformers"] and written["time"]
    pope = written["benchmarks"]["pope"]
    assert pope["decoding"] == {"strategy": "greedy", "do_sample": False, "num_beams": 1, "temperature": 0.0,
                                "max_new_tokens": 5}
    assert pope["batch_size"] == 8 and pope["padding_side"] == "left" and pope["questions"] == 12
    assert pope["benchmark"]["version"] == "1" and set(pope["benchmark"]["files"]) == {
        "coco/coco_pope_random.json", "coco/coco_pope_popular.json", "coco/coco_pope_adversarial.json"}
    assert pope["prompt_example"] == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    lines = [json.loads(line) for line in (out / "pope" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines][:2] == ["random/1", "random/2"]
    assert set(lines[0]) == {"question_id", "prompt", "text", "parsed", "model_id"}
    table = (out / "results.md").read_text()
    assert "| easy-vqa | test | 24 | accuracy |" in table and "| pope | all | 12 | f1 |" in table
    again = evaluate(str(checkpoint), "pope", data=data, out_dir=out, batch_size=8, limit=24, max_new_tokens=5,
                     progress=False)
    assert again["benchmarks"]["pope"]["timing"]["generated"] == 0  # every prediction was read back
    assert _without_time(again) == _without_time(results)  # and easy-vqa's entry is kept
    with pytest.raises(RuntimeError, match=r"made with other settings \(batch_size differ\)"):
        evaluate(str(checkpoint), "pope", data=data, out_dir=out, batch_size=4, limit=24, max_new_tokens=5,
                 progress=False)


def test_a_last_line_cut_short_by_a_crash_is_dropped_and_answered_again(trained_model, data, tmp_path):
    model, bench = trained_model["model"], get_benchmark("pope", data)
    whole = evaluate_benchmark(model, bench, tmp_path / "a", batch_size=4, max_new_tokens=5)
    folder = tmp_path / "b" / "pope"
    evaluate_benchmark(model, bench, tmp_path / "b", batch_size=4, max_new_tokens=5)
    lines = (folder / "predictions.jsonl").read_text().splitlines(keepends=True)
    (folder / "predictions.jsonl").unlink()
    (folder / "predictions.rank0.jsonl").write_text("".join(lines[:5]) + lines[5][:17])  # died mid-write
    resumed = evaluate_benchmark(model, bench, tmp_path / "b", batch_size=4, max_new_tokens=5)
    assert resumed.record["timing"]["generated"] == len(lines) - 5
    assert resumed.outputs == whole.outputs
    assert (folder / "predictions.jsonl").read_text() == (tmp_path / "a" / "pope" / "predictions.jsonl").read_text()


def test_a_run_killed_mid_benchmark_resumes_to_the_same_results(checkpoint, tmp_path):
    args = ["easy-vqa", "--limit", "64", "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "zoo.cli", "eval", str(checkpoint), "--benchmark", *args,
                                "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stream = killed / "easy-vqa" / "predictions.rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if stream.exists() and stream.read_bytes().count(b"\n") >= 10:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    answered = stream.read_bytes().count(b"\n")
    assert 10 <= answered < 64 and not (killed / "results.json").exists()

    resumed = evaluate(str(checkpoint), "easy-vqa", out_dir=killed, batch_size=2, limit=64, max_new_tokens=4,
                       progress=False)
    assert resumed["benchmarks"]["easy-vqa"]["timing"]["generated"] == 64 - answered
    whole = evaluate(str(checkpoint), "easy-vqa", out_dir=tmp_path / "whole", batch_size=2, limit=64,
                     max_new_tokens=4, progress=False)
    assert _without_time(json.loads((killed / "results.json").read_text())) == \
        _without_time(json.loads((tmp_path / "whole" / "results.json").read_text()))
    assert (killed / "easy-vqa" / "predictions.jsonl").read_text() == \
        (tmp_path / "whole" / "easy-vqa" / "predictions.jsonl").read_text()
    assert whole["benchmarks"]["easy-vqa"]["scores"] == resumed["benchmarks"]["easy-vqa"]["scores"]


def test_shard_is_disjoint_and_covering():
    items = list(range(11))
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == items and [len(p) for p in parts] == [4, 4, 3]
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 3"):
        shard(items, 3, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_shard_gather_and_match_one_process(checkpoint, data, tmp_path):
    args = [sys.executable, "-m", "zoo.cli", "eval", str(checkpoint), "--benchmark", "pope,mmbench", "--data",
            str(data), "--batch-size", "3", "--max-new-tokens", "5", "--no-progress", "--out", str(tmp_path / "ddp")]
    port = _free_port()
    ranks = [subprocess.Popen(args, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    for process in ranks:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err.decode()[-3000:]
    single = evaluate(str(checkpoint), "pope,mmbench", data=data, out_dir=tmp_path / "one", batch_size=3,
                      max_new_tokens=5, progress=False)
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    for name in ("pope", "mmbench"):
        assert ddp["benchmarks"][name]["world_size"] == 2
        assert ddp["benchmarks"][name]["scores"] == single["benchmarks"][name]["scores"]
        assert (tmp_path / "ddp" / name / "predictions.jsonl").read_text() == \
            (tmp_path / "one" / name / "predictions.jsonl").read_text()
        assert not list((tmp_path / "ddp" / name).glob("predictions.rank*.jsonl"))
        # each rank answered its own half: rank 1 did the odd-numbered samples
        assert ddp["benchmarks"][name]["timing"]["generated"] == len(shard(range(ddp["benchmarks"][name]["samples"]),
                                                                            0, 2))


def test_eval_callback_scores_the_model_while_it_trains(trained_model, easy_vqa):
    from zoo.eval import EvalCallback
    from zoo.train import TrainConfig, VQASplit, VQATrainingSet, fit

    model = copy.deepcopy(trained_model["model"])  # the session's model stays as it is
    train = easy_vqa["train"]
    few = VQASplit(train.images[:40], [s for s in train.samples if s.image < 40])  # 4 steps need few images
    callback = EvalCallback("easy-vqa", every_n_steps=2, limit=24, batch_size=12)
    module = fit(model, VQATrainingSet(model, few), TrainConfig(steps=4, batch_size=8, lr=1e-3), progress=False,
                 callbacks=[callback])
    assert [h["step"] for h in callback.history] == [2, 4]
    final = evaluate_benchmark(model, EasyVQA(), limit=24, batch_size=5)
    assert callback.history[-1]["accuracy"] == final.scores["accuracy"]  # the step-4 evaluation is of these weights
    logged = module.trainer.callback_metrics
    assert float(logged["eval/easy-vqa/accuracy"]) == pytest.approx(final.scores["accuracy"])

"""User errors on the command line: each kind prints one line ``zoo <command>: error: <the sentence>`` and exits 2,
three of them run as a user runs them (the installed ``zoo`` entry point of this environment, in a subprocess), the
rest through the same `zoo.cli.main` in this process; ``--debug`` /
``ZOO_DEBUG=1`` give the traceback back, and a bug keeps its traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from image_faults import png

import zoo
from zoo.cli import main

ZOO = Path(sys.executable).parent / "zoo"  # the console script pip installed for this environment
RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "recipes" / "llava-1.5-tiny.yaml")

# kind -> (arguments, with {tmp} for the fixture folder; the one line expected on stderr, a regular expression)
KINDS = {
    "bad argument": (["eval", "{tmp}/model", "--benchmark", "easy-vqa", "--limit", "0"],
                     r"zoo eval: error: argument --limit: expected an integer >= 1, got 0 \(see zoo eval --help\)"),
    "missing argument": (["card"], r"zoo card: error: give a catalogue name, or --all --out DIR"),
    "unknown name": (["build", "tiny-lava"],
                     r"zoo build: error: unknown model 'tiny-lava'; did you mean 'tiny-llava'\? Registered models: .*"),
    "bad recipe": (["train", RECIPE, "--set", "stages.0.train.stepz=5"],
                   r"zoo train: error: .*llava-1\.5-tiny\.yaml: unknown key 'stages\[0\]\.train\.stepz'; did you mean "
                   r"'stages\[0\]\.train\.steps'\? Valid keys: .*"),
    "unreadable checkpoint": (["eval", "{tmp}/truncated", "--benchmark", "easy-vqa"],
                              r"zoo eval: error: .*truncated/model\.safetensors: truncated or corrupt safetensors "
                              r"file .*"),
    "missing data": (["eval", "{tmp}/model", "--benchmark", "pope", "--data", "{tmp}/nowhere"],
                     r"zoo eval: error: pope: .*nowhere/coco/coco_pope_random\.json not found .*"),
    "missing data file": (["convert", "llava-to-wds", "{tmp}/nowhere.json", "--out", "{tmp}/wds/s-%05d.tar"],
                          r"zoo convert: error: .*nowhere\.json: No such file or directory"),
    "bad benchmark file": (["eval", "{tmp}/model", "--benchmark", "pope", "--data", "{tmp}/pope"],
                           r"zoo eval: error: .*coco_pope_random\.json: line 1 is not valid JSON \(.*\)"),
    "unusable image": (["chat", "{tmp}/model", "--image", "{tmp}/dot.png", "--question", "what?"],
                       r"zoo chat: error: --image .*dot\.png: 1x1 pixels is too small \(each side must be at least 2\)"),
}
# run as the installed console script in a process of their own (argparse's own exit, an error before and after
# torch is imported); the others call the same `main` in this process (each process costs ~7 s of imports)
IN_A_PROCESS = ("bad argument", "unknown name", "unreadable checkpoint")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every kind's command, run concurrently (each process pays the import cost): kind -> CompletedProcess-like
    ``(returncode, stdout, stderr)``."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    model = zoo.build(tiny_config())
    model.save_pretrained(tmp / "model")
    model.save_pretrained(tmp / "truncated")
    weights = tmp / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp / "pope" / "coco").mkdir(parents=True)
    for split in ("random", "popular", "adversarial"):
        (tmp / "pope" / "coco" / f"coco_pope_{split}.json").write_text('{"question_id": 1, "image": \n')
    (tmp / "dot.png").write_bytes(png((1, 1)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ZOO_DEBUG": ""}
    argv = {kind: [a.format(tmp=tmp) for a in args] for kind, (args, _) in KINDS.items()}
    procs = {kind: subprocess.Popen([str(ZOO), *argv[kind]], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for kind in IN_A_PROCESS}
    results = {kind: _in_process(argv[kind]) for kind in KINDS if kind not in IN_A_PROCESS}
    return {**results, **{kind: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for kind, p in procs.items()}}


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_each_user_error_is_one_line_and_exit_status_2(runs, kind):
    status, out, err = runs[kind]
    assert status == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1 and re.fullmatch(KINDS[kind][1], err.rstrip("\n")), err


def test_the_same_one_line_in_process(tmp_path, capsys):
    """What the subprocesses above show, for two more kinds, without paying for another process each."""
    assert main(["train", RECIPE, "--set", "stages.0.train.steps=-3"]) == 2
    assert re.fullmatch(r"zoo train: error: .*llava-1\.5-tiny\.yaml: stages\[0\]\.train\.steps: must be >= 1, got -3\n",
                        capsys.readouterr().err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("zoo convert: error: config.json: model_type 'bert' is not a known layout (zoo, "
                                       "llava-hf, llava, moe-llava, cumo)\n")


def test_debug_shows_the_traceback(monkeypatch, capsys):
    with pytest.raises(zoo.UnknownPartError, match="unknown model 'tiny-lava'"):
        main(["build", "tiny-lava", "--debug"])
    with pytest.raises(zoo.UnknownPartError):
        main(["--debug", "build", "tiny-lava"])  # before the command too
    monkeypatch.setenv("ZOO_DEBUG", "1")
    with pytest.raises(zoo.UnknownPartError):
        main(["build", "tiny-lava"])
    monkeypatch.setenv("ZOO_DEBUG", "0")
    assert main(["build", "tiny-lava"]) == 2
    assert capsys.readouterr().err.startswith("zoo build: error: unknown model 'tiny-lava'")


def test_a_bug_keeps_its_traceback(monkeypatch):
    import zoo.cli

    def broken(args):
        return {}["a key that a bug forgot"]

    monkeypatch.setattr(zoo.cli, "_cmd_params", broken)
    with pytest.raises(KeyError, match="a key that a bug forgot"):
        main(["params", "tiny-llava"])  # not a user error: no one-line message, the exception propagates

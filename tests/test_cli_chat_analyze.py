"""`zoo chat` and `zoo analyze routing` on the small demo-style checkpoint of conftest's `demo_checkpoint`."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from test_eval_data import write_pope

import zoo
from zoo.chat import ChatSession, interactive
from zoo.cli import main
from zoo.images import ImageError


def test_chat_one_shot_answers_like_the_model(demo_checkpoint, capsys, easy_vqa):
    model, image = demo_checkpoint["model"], Image.open(demo_checkpoint["image"]).convert("RGB")
    questions = ["what color is the shape?", "is there a circle in the image?"]
    assert main(["chat", str(demo_checkpoint["path"]), "--image", str(demo_checkpoint["image"]),
                 "--question", questions[0]]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == model.answer([image], [questions[0]])[0]
    import easy_vqa as package

    assert answer in package.get_answers()  # a trained model answers with an easy-vqa answer word
    # two questions are one conversation: the second continues after the first answer and its EOS
    chat = ChatSession(model, image)
    first = chat.ask(questions[0])
    expected = model.encode_prompt(questions[0]) + model.encode_answer(first) + \
        model.tokenizer(" " + questions[1], add_special_tokens=False).input_ids
    assert chat.prompt_ids(questions[1]) == expected
    second = chat.ask(questions[1])
    assert main(["chat", str(demo_checkpoint["path"]), "--image", str(demo_checkpoint["image"]),
                 "--question", questions[0], "--question", questions[1]]) == 0
    assert capsys.readouterr().out.splitlines() == [first, second]


def test_chat_interactive_loop(demo_checkpoint):
    model = demo_checkpoint["model"]
    image = Image.open(demo_checkpoint["image"]).convert("RGB")
    out = io.StringIO()
    n = interactive(ChatSession(model, image), ["what color is the shape?", "", "/reset", "   ",
                                                f"/image {demo_checkpoint['image']}", "what shape is it?", "/quit",
                                                "never asked"], out)
    lines = out.getvalue().splitlines()
    assert n == 2 and lines[0] == f"model> {model.answer([image], ['what color is the shape?'])[0]}"
    assert lines[1:3] == ["(new conversation)", "(new image, new conversation)"]
    assert lines[3] == f"model> {model.answer([image], ['what shape is it?'])[0]}" and len(lines) == 4
    with pytest.raises(ImageError, match="--image /nonexistent.png: missing image file"):
        main(["chat", str(demo_checkpoint["path"]), "--image", "/nonexistent.png", "--question", "x", "--debug"])


def test_analyze_routing_tables_and_heatmaps_by_modality_and_benchmark(demo_checkpoint, tmp_path, capsys):
    write_pope(tmp_path / "data" / "pope")
    out = tmp_path / "analysis"
    assert main(["analyze", "routing", str(demo_checkpoint["path"]), "--benchmark", "easy-vqa,pope",
                 "--data", str(tmp_path / "data"), "--limit", "40", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "easy-vqa:\n| layer | modality | tokens | load per expert (%)" in printed
    report = json.loads((out / "routing.json").read_text())
    easy, pope = report["benchmarks"]["easy-vqa"], report["benchmarks"]["pope"]
    model = demo_checkpoint["model"]
    pope_questions = len(zoo.eval.get_benchmark("pope", tmp_path / "data").load(40))
    for rows, questions in ((easy, 40), (pope, pope_questions)):
        by = {(r["layer"], r["modality"]): r for r in rows}
        assert set(by) == {("lm.layers.0", m) for m in ("all", "image", "text")}
        # every image token of every question is routed (dropless at eval: capacity 2.0 x top-2 of 4)
        assert by[("lm.layers.0", "image")]["tokens"] == questions * model.num_image_tokens
        assert by[("lm.layers.0", "all")]["tokens"] == by[("lm.layers.0", "image")]["tokens"] + \
            by[("lm.layers.0", "text")]["tokens"]
        for row in rows:
            assert sum(row["load"]) == pytest.approx(1.0) and len(row["load"]) == 4 and row["drop_rate"] == 0.0
    # a text token count closed form: easy-vqa prompts are the question tokens plus <s> (image placeholder excluded)
    samples = zoo.eval.get_benchmark("easy-vqa").load(40)
    text_tokens = sum(len(model.encode_prompt(s.question)) - 1 for s in samples)
    assert {r["modality"]: r["tokens"] for r in easy}["text"] == text_tokens
    for png in ("routing-easy-vqa.png", "routing-pope.png", "routing-by-benchmark.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 100
    text = (out / "routing.md").read_text()
    assert "## By benchmark" in text and "| lm.layers.0 | image |" in text


def test_analyze_refuses_a_dense_model(trained_model, tmp_path):
    from zoo.analyze import analyze_routing

    with pytest.raises(ValueError, match="no routed layer"):
        analyze_routing(trained_model["model"], limit=4, out_dir=tmp_path)

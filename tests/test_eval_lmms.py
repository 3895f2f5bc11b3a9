"""The lmms-eval adapter: lmms-eval-shaped requests answered by a short-trained tiny model, and lmms-eval's own
evaluator (the ``lmms`` extra, which ``make test`` installs) running the registered model ``zoo`` on a local task."""

import json
import textwrap

import pytest
import torch

from zoo.eval import normalize_answer
from zoo.eval.lmms import generate_until, loglikelihood


@pytest.fixture(scope="module")
def task(easy_vqa):
    """A local task in lmms-eval's shape: ``task_dict[task][split][doc_id]`` documents and a ``doc_to_visual``."""
    test = easy_vqa["test"]
    docs = [{"image": test.images[s.image], "question": s.question, "answer": s.answer} for s in test.samples[:12]]
    return {"easy": {"test": docs}}, lambda doc: [doc["image"]]


def test_generate_until_answers_as_the_model_does_in_request_order(trained_model, task):
    model = trained_model["model"]
    task_dict, visual = task
    docs = task_dict["easy"]["test"]
    short, longer = {"max_new_tokens": 4, "until": ["\n"]}, {"max_new_tokens": 6, "temperature": 0}
    requests = [(d["question"], short if i % 3 else longer, visual, i, "easy", "test") for i, d in enumerate(docs)]
    answers = generate_until(model, requests, task_dict, batch_size=5)
    expected = [model.answer([d["image"]], [d["question"]], max_new_tokens=4 if i % 3 else 6)[0]
                for i, d in enumerate(docs)]
    assert answers == expected
    assert sum(normalize_answer(a) == d["answer"] for a, d in zip(answers, docs)) > 0  # the model answers
    cut = generate_until(model, [(docs[0]["question"], {"until": [answers[0][1:2]]}, visual, 0, "easy", "test")],
                         task_dict)
    assert cut == [answers[0][:1]]  # the answer stops before the first stop string


def test_sampling_and_several_images_are_refused(trained_model, task):
    model = trained_model["model"]
    task_dict, visual = task
    with pytest.raises(ValueError, match="zoo decodes greedily only"):
        generate_until(model, [("q", {"do_sample": True, "temperature": 0.7}, visual, 0, "easy", "test")], task_dict)
    with pytest.raises(ValueError, match=r"doc 0: zoo models answer about exactly one image, the task gave "
                                         r"\['Image', 'Image'\]"):
        generate_until(model, [("q", {}, lambda d: [d["image"]] * 2, 0, "easy", "test")], task_dict)


def test_loglikelihood_is_the_models_own_teacher_forced_log_probability(trained_model, task):
    model = trained_model["model"]
    task_dict, visual = task
    doc = task_dict["easy"]["test"][0]
    answer_ids = model.encode_answer(doc["answer"])[:-1]
    prompt = model.encode_prompt(doc["question"])
    ids = torch.tensor([prompt + answer_ids])
    labels = torch.tensor([[-100] * len(prompt) + answer_ids])
    pixels = model.vision.preprocess([doc["image"]])
    with torch.no_grad():
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).lm_loss  # mean NLL of the answer tokens
    requests = [(doc["question"], doc["answer"], visual, 0, "easy", "test"),  # the target as a string
                (doc["question"], lambda d: "blue" if d["answer"] != "blue" else "red", visual, 0, "easy", "test")]
    (logprob, greedy), (other_logprob, _) = loglikelihood(model, requests, task_dict)
    assert logprob == pytest.approx(-float(loss) * len(answer_ids), rel=1e-5)
    generated = model.answer([doc["image"]], [doc["question"]], max_new_tokens=len(answer_ids))[0]
    assert greedy == (normalize_answer(generated) == doc["answer"])
    if greedy:  # the model's own answer is more likely than another answer word
        assert other_logprob < logprob


TASK_YAML = """\
task: zoo_local_easy_vqa
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """\
from PIL import Image

from zoo.eval import normalize_answer


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}
"""


def test_lmms_eval_runs_the_zoo_model_by_name_and_scores_as_zoo_eval(trained_model, easy_vqa, tmp_path):
    """lmms-eval's own evaluator (``simple_evaluate``, what its CLI runs) with ``--model zoo`` (found through the
    ``lmms_eval.models`` entry point) on a local task built from the first easy-vqa test questions: the same answers,
    question by question, and the same accuracy as ``zoo eval --benchmark easy-vqa --limit N``."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from zoo.eval import evaluate
    from zoo.eval.lmms_model import ZooLMMS

    assert get_model("zoo") is ZooLMMS
    checkpoint = tmp_path / "model"
    trained_model["model"].save_pretrained(checkpoint)
    test, n = easy_vqa["test"], 16
    rows = []
    for i, sample in enumerate(test.samples[:n]):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        test.images[sample.image].save(path)  # PNG: the pixels zoo eval reads from the package
        rows.append({"image_path": str(path), "question": sample.question, "answer": sample.answer})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "zoo_local_easy_vqa.yaml").write_text(TASK_YAML.format(data=tmp_path / "data.jsonl"))
    (tasks / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    results = simple_evaluate(model="zoo", model_args=f"pretrained={checkpoint},batch_size=4",
                              tasks=["zoo_local_easy_vqa"], task_manager=TaskManager(include_path=str(tasks)),
                              log_samples=True)
    ours = evaluate(str(checkpoint), "easy-vqa", limit=n, batch_size=4, out_dir=tmp_path / "zoo-eval", progress=False)
    zoo_answers = [json.loads(line)["text"] for line in
                   (tmp_path / "zoo-eval" / "easy-vqa" / "predictions.jsonl").read_text().splitlines()]
    samples = sorted(results["samples"]["zoo_local_easy_vqa"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == zoo_answers
    score = 100 * results["results"]["zoo_local_easy_vqa"]["exact_match,none"]
    assert score == pytest.approx(ours["benchmarks"]["easy-vqa"]["scores"]["accuracy"])
    assert 0 < score  # the trained model gets some right: not a comparison of two empty answer lists

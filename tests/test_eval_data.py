"""Benchmark readers on fixtures written here in each benchmark's released file layout (a few questions, 8 px
images), and the errors malformed files give. ``write_fixture(name, root)`` is shared with the harness tests."""

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
from image_faults import UNUSABLE, png
from PIL import Image

from zoo.eval import BENCHMARKS, BenchmarkDataError, get_benchmark
from zoo.eval.benchmark import LETTER_ANSWER, SHORT_ANSWER
from zoo.eval.metrics import MME_COGNITION, MME_PERCEPTION, MME_SUBTASKS


def _image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def write_vqav2(root: Path) -> dict[str, str]:
    questions = [(1, 42, "What color is the square?"), (2, 42, "How many squares are there?"), (3, 7, "Is it round?")]
    answers = {1: ["red"] * 10, 2: ["two"] * 3 + ["2"] * 2 + ["3"] * 5, 3: ["yes"] * 9 + ["no"]}
    kinds = {1: "other", 2: "number", 3: "yes/no"}
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t in questions]})
    _json(root / "v2_mscoco_val2014_annotations.json", {"info": {}, "license": {}, "data_subtype": "val2014",
          "annotations": [{"question_id": q, "image_id": i, "question_type": "what", "answer_type": kinds[q],
                           "multiple_choice_answer": answers[q][-1],
                           "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                                       for n, a in enumerate(answers[q])]} for q, i, _ in questions]})
    for image_id in (42, 7):
        _image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return {"1": "Red.", "2": "3", "3": "Yes"}


def write_gqa(root: Path) -> dict[str, str]:
    _json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n161313", "question": "Is the shape red?", "answer": "yes", "fullAnswer": "Yes, it is.",
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "202": {"imageId": "n161313", "question": "Which color is it?", "answer": "red", "fullAnswer": "It is red.",
                "types": {"structural": "query", "semantic": "attr", "detailed": "colorQuery"}}})
    _image(root / "images" / "n161313.jpg")
    return {"201": "Yes.", "202": " red"}


def write_textvqa(root: Path) -> dict[str, str]:
    records = [{"question": "what brand is the camera?", "image_id": "003a8ae2ef43b901", "image_classes": ["Camera"],
                "flickr_original_url": "", "flickr_300k_url": "", "image_width": 8, "image_height": 8,
                "answers": ["nikon"] * 8 + ["nikon d90"] * 2, "question_tokens": ["what"], "question_id": 34602,
                "set_name": "val"},
               {"question": "what number is shown?", "image_id": "00b2bda0a0f1e2c5", "image_classes": [],
                "flickr_original_url": "", "flickr_300k_url": "", "image_width": 8, "image_height": 8,
                "answers": ["10"] * 10, "question_tokens": ["what"], "question_id": 34603, "set_name": "val"}]
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                            "dataset_version": "0.5.1", "data": records})
    _json(root / "TextVQA_Rosetta_OCR_v0.2_val.json", {"dataset_name": "textvqa", "data": [
        {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["nikon", "d90"], "ocr_info": []},
        {"image_id": "00b2bda0a0f1e2c5", "ocr_tokens": [], "ocr_info": []}]})
    for record in records:
        _image(root / "train_images" / f"{record['image_id']}.jpg")
    return {"34602": "Nikon", "34603": "ten"}


def write_vizwiz(root: Path) -> dict[str, str]:
    records = [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other",
                "answerable": 1, "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10},
               {"image": "VizWiz_val_00000001.jpg", "question": "What does it say?", "answer_type": "unanswerable",
                "answerable": 0, "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}]
    _json(root / "Annotations" / "val.json", records)
    for record in records:
        _image(root / "val" / record["image"])
    return {"VizWiz_val_00000000.jpg": "Soup", "VizWiz_val_00000001.jpg": "Unanswerable"}


def write_scienceqa(root: Path) -> dict[str, str]:
    def problem(question, choices, answer, hint, image, subject="natural science"):
        return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
                "task": "closed choice", "grade": "grade4", "subject": subject, "topic": "t", "category": "c",
                "skill": "s", "lecture": "", "solution": "", "split": "test"}

    _json(root / "problems.json", {
        "5": problem("Which animal is shown?", ["cat", "dog", "fish"], 1, "Look at the picture.", "image.png"),
        "6": problem("Which is a mammal?", ["eel", "bat"], 1, "", None),  # no image: not in ScienceQA-IMG
        "7": problem("Which word rhymes?", ["bat", "cot", "dig", "ten"], 3, "", "image.png", "language science")})
    _json(root / "pid_splits.json", {"train": [], "val": [], "test": ["5", "6", "7"], "minival": []})
    for pid in ("5", "7"):
        _image(root / "test" / pid / "image.png")
    return {"5": "B", "7": "D. ten"}


def write_pope(root: Path) -> dict[str, str]:
    correct = {}
    for offset, split in enumerate(("random", "popular", "adversarial")):
        lines = []
        for k, (thing, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("tree", "no")]):
            qid = 10 * offset + k + 1
            lines.append(json.dumps({"question_id": qid, "image": "COCO_val2014_000000310196.jpg",
                                     "text": f"Is there a {thing} in the image?", "label": label}))
            correct[f"{split}/{qid}"] = "Yes, there is." if label == "yes" else "No, there is not."
        (root / "coco").mkdir(parents=True, exist_ok=True)
        (root / "coco" / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    _image(root / "val2014" / "COCO_val2014_000000310196.jpg")
    return correct


SPLIT_LAYOUT = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/


def write_mme(root: Path) -> dict[str, str]:
    correct = {}
    for subtask in MME_SUBTASKS:
        folder = root / subtask
        for n in range(2):
            stem = f"{subtask}_{n}"
            split = subtask in SPLIT_LAYOUT
            text = (folder / "questions_answers_YN" if split else folder) / f"{stem}.txt"
            _image((folder / "images" if split else folder) / f"{stem}.jpg")
            text.parent.mkdir(parents=True, exist_ok=True)
            text.write_text("Is there a red shape? Please answer yes or no.\tYes\n"
                            "Is there a blue shape? Please answer yes or no.\tNo\n")
            correct[f"{subtask}/{stem}/0"], correct[f"{subtask}/{stem}/1"] = "Yes", "No"
    return correct


def png_base64(colour=(10, 200, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split",
                   "image"]


def write_mmbench_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, MMBENCH_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def mmbench_rows() -> list[dict]:
    return [
        {"index": 0, "question": "What colour is the square?", "hint": "nan", "A": "red", "B": "green",
         "C": "blue", "D": "black", "answer": "B", "category": "attribute", "l2-category": "fine", "split": "dev",
         "image": png_base64()},
        {"index": 1, "question": "Is it a square?", "hint": "Look closely.", "A": "yes", "B": "no", "C": "nan",
         "D": "nan", "answer": "A", "category": "shape", "l2-category": "coarse", "split": "dev",
         "image": "0"},  # VLMEvalKit's reference to row 0's image
        {"index": 2, "question": "How many shapes?", "hint": "nan", "A": "one", "B": "two", "C": "three",
         "D": "nan", "answer": "C", "category": "shape", "l2-category": "coarse", "split": "dev",
         "image": png_base64((0, 0, 255))}]


def write_mmbench(root: Path) -> dict[str, str]:
    rows = mmbench_rows()
    write_mmbench_rows(root / "mmbench_dev_20230712.tsv", rows)
    correct = {}
    for row in rows:
        options = [row[c] for c in "ABCD" if row[c] != "nan"]
        answer = options["ABCD".index(row["answer"])]
        for rotation in range(len(options)):
            rotated = options[rotation:] + options[:rotation]
            correct[f"{row['index']}/{rotation}"] = "ABCD"[rotated.index(answer)]
    return correct


def write_seed(root: Path) -> dict[str, str]:
    questions = [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
         "data_id": "1454426_2591111986.jpg", "data_type": "image", "question": "How many towels are there?",
         "question_id": "101669", "question_type_id": 5},
        {"answer": "C", "choice_a": "a park", "choice_b": "a kitchen", "choice_c": "a street", "choice_d": "a beach",
         "data_id": "1454427_2591111987.jpg", "data_type": "image", "question": "Where is this?",
         "question_id": "101670", "question_type_id": 1},
        {"answer": "B", "choice_a": "run", "choice_b": "jump", "choice_c": "sit", "choice_d": "swim",
         "data_id": "v1234.webm", "data_type": "video", "question": "What happens?", "question_id": "201001",
         "question_type_id": 10}]  # a video dimension: not in SEED-IMG
    _json(root / "SEED-Bench.json", {"question_type": {"Scene Understanding": 1, "Instance Counting": 5,
                                                       "Action Recognition": 10}, "questions": questions})
    for q in questions[:2]:
        _image(root / "SEED-Bench-image" / q["data_id"])
    return {"101669": "A", "101670": "C."}


WRITERS = {"vqav2": write_vqav2, "gqa": write_gqa, "textvqa": write_textvqa, "textvqa-ocr": write_textvqa,
           "vizwiz": write_vizwiz, "scienceqa-img": write_scienceqa, "pope": write_pope, "mme": write_mme,
           "mmbench": write_mmbench, "seed-bench": write_seed}


def write_fixture(name: str, root: Path) -> dict[str, str]:
    """Write benchmark ``name``'s fixture under ``root/<name>``; returns correct outputs by sample id."""
    return WRITERS[name](root / name)


def _perfect(name: str, tmp_path: Path):
    if name == "easy-vqa":
        bench = get_benchmark(name)
        samples = bench.load(limit=30)
        return bench, samples, {s.id: s.target for s in samples}
    correct = write_fixture(name, tmp_path)
    bench = get_benchmark(name, tmp_path)
    return bench, bench.load(), correct


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_every_benchmark_reads_its_release_layout_and_scores_correct_outputs_as_perfect(name, tmp_path):
    bench, samples, correct = _perfect(name, tmp_path)
    assert sorted(s.id for s in samples) == sorted(correct)
    for sample in samples:
        assert sample.load_image().mode == "RGB"
        assert bench.prompt(sample).endswith(bench.suffix)
    scores = bench.score(samples, [correct[s.id] for s in samples])
    if name == "mme":
        assert scores["perception"] == pytest.approx(200 * len(MME_PERCEPTION))
        assert scores["cognition"] == pytest.approx(200 * len(MME_COGNITION))
    else:
        assert scores[bench.metrics[0]] == pytest.approx(100.0)
    wrong = bench.score(samples, ["zebra"] * len(samples))
    assert wrong[bench.metrics[0]] < scores[bench.metrics[0]]
    described = bench.describe()
    assert described["name"] == name and described["version"] and described["split"]
    assert all(len(digest) == 64 for digest in described["files"].values())


def test_prompts_follow_the_llava_protocols(tmp_path):
    for name in WRITERS:
        write_fixture(name, tmp_path)

    def first_prompt(name, sample_id=None):
        bench = get_benchmark(name, tmp_path)
        samples = bench.load()
        sample = next(s for s in samples if sample_id in (None, s.id))
        return bench.prompt(sample)

    assert first_prompt("vqav2") == "What color is the square?" + SHORT_ANSWER
    assert first_prompt("vizwiz") == ("What is this?\nWhen the provided information is insufficient, respond with "
                                      "'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert first_prompt("textvqa") == "what brand is the camera?" + SHORT_ANSWER
    assert first_prompt("textvqa-ocr") == "what brand is the camera?\nReference OCR token: nikon, d90" + SHORT_ANSWER
    assert first_prompt("textvqa-ocr", "34603") == "what number is shown?" + SHORT_ANSWER  # no OCR token: no line
    assert first_prompt("scienceqa-img") == ("Context: Look at the picture.\nWhich animal is shown?\nA. cat\nB. dog\n"
                                             "C. fish" + LETTER_ANSWER)
    assert first_prompt("scienceqa-img", "7") == "Which word rhymes?\nA. bat\nB. cot\nC. dig\nD. ten" + LETTER_ANSWER
    assert first_prompt("mmbench", "1/1") == "Look closely.\nIs it a square?\nA. no\nB. yes" + LETTER_ANSWER
    assert first_prompt("mmbench", "0/0") == ("What colour is the square?\nA. red\nB. green\nC. blue\nD. black"
                                              + LETTER_ANSWER)
    assert first_prompt("seed-bench") == "How many towels are there?\nA. One\nB. Two\nC. Three\nD. Four" + LETTER_ANSWER
    assert first_prompt("mme") == "Is there a red shape? Please answer yes or no."  # the question carries its suffix
    assert first_prompt("pope") == "Is there a dog in the image?" + SHORT_ANSWER
    assert first_prompt("gqa") == "Is the shape red?" + SHORT_ANSWER


def test_readers_keep_the_protocol_subsets(tmp_path):
    write_scienceqa(tmp_path / "sqa")
    write_seed(tmp_path / "seed")
    write_mmbench(tmp_path / "mmb")
    assert [s.id for s in get_benchmark("scienceqa-img", tmp_path / "sqa").load()] == ["5", "7"]  # image subset
    seed = get_benchmark("seed-bench", tmp_path / "seed").load()
    assert [s.meta["dimension"] for s in seed] == ["Instance Counting", "Scene Understanding"]  # no video
    mmbench = get_benchmark("mmbench", tmp_path / "mmb")
    samples = mmbench.load()
    assert len(samples) == 4 + 2 + 3  # one pass per option
    assert samples[4].image == samples[0].image  # the image cell "0" reused row 0's image
    assert [s.meta["options"] for s in samples[:4]][1] == ["green", "blue", "black", "red"]
    assert [s.target for s in samples[:4]] == ["B", "A", "D", "C"]  # "green" follows the rotation
    assert {s.meta["index"] for s in mmbench.load(limit=2)} == {0, 1}  # --limit counts questions, not passes


# ---------------------------------------------------------------------------- malformed files
def test_missing_field_names_the_file_and_the_record(tmp_path):
    write_vqav2(tmp_path)
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    document = json.loads(path.read_text())
    del document["annotations"][1]["answers"]
    path.write_text(json.dumps(document))
    with pytest.raises(BenchmarkDataError, match=r"v2_mscoco_val2014_annotations\.json: annotation 1 \(question_id 2\)"
                                                 r": missing field\(s\) \['answers'\]"):
        get_benchmark("vqav2", tmp_path).load()


def test_unknown_question_id_in_annotations_names_the_file_and_the_record(tmp_path):
    write_vqav2(tmp_path)
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    document = json.loads(path.read_text())
    document["annotations"].append({**document["annotations"][0], "question_id": 999})
    path.write_text(json.dumps(document))
    with pytest.raises(BenchmarkDataError, match=r"annotations\.json: annotation 3 \(question_id 999\): unknown "
                                                 r"question id \(not in v2_OpenEnded_mscoco_val2014_questions\.json\)"):
        get_benchmark("vqav2", tmp_path).load()


def test_undecodable_base64_image_names_the_file_and_the_record(tmp_path):
    rows = mmbench_rows()
    rows[2]["image"] = "not*base64!"
    write_mmbench_rows(tmp_path / "mmbench_dev_20230712.tsv", rows)
    with pytest.raises(BenchmarkDataError, match=r"mmbench_dev_20230712\.tsv: line 4 \(index '2'\): image column is "
                                                 r"not valid base64"):
        get_benchmark("mmbench", tmp_path).load()
    rows[2]["image"] = base64.b64encode(b"these bytes are no image").decode()
    write_mmbench_rows(tmp_path / "mmbench_dev_20230712.tsv", rows)
    with pytest.raises(BenchmarkDataError, match=r"line 4 \(index '2'\): image column decodes to no readable image"):
        get_benchmark("mmbench", tmp_path).load()


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "coco" / "coco_pope_popular.json").write_text('{"question_id": 1, "image": "x.jpg"\n'),
     r"coco_pope_popular\.json: line 1 is not valid JSON"),
    (lambda root: (root / "val2014" / "COCO_val2014_000000310196.jpg").unlink(),
     r"coco_pope_random\.json: line 1: image .*COCO_val2014_000000310196\.jpg not found"),
    (lambda root: (root / "coco" / "coco_pope_adversarial.json").unlink(),
     r"pope: .*coco_pope_adversarial\.json not found \(the pope release layout expects it"),
])
def test_damaged_pope_files(tmp_path, damage, message):
    write_pope(tmp_path)
    damage(tmp_path)
    with pytest.raises(BenchmarkDataError, match=message):
        get_benchmark("pope", tmp_path).load()


def test_mme_needs_one_yes_and_one_no_question_per_image(tmp_path):
    write_mme(tmp_path)
    path = tmp_path / "count" / "count_1.txt"
    path.write_text("Are there two? Please answer yes or no.\tYes\nAre there three? Please answer yes or no.\tYes\n")
    with pytest.raises(BenchmarkDataError, match=r"count_1\.txt: expected one yes and one no question"):
        get_benchmark("mme", tmp_path).load()
    path.write_text("Are there two? Please answer yes or no.\n")
    with pytest.raises(BenchmarkDataError, match=r"count_1\.txt: line 1: expected 'question<TAB>Yes\|No'"):
        get_benchmark("mme", tmp_path).load()
    (tmp_path / "count" / "count_1.txt").unlink()
    (tmp_path / "count" / "count_1.jpg").unlink()
    for subtask in ("OCR", "artwork"):
        for item in sorted((tmp_path / subtask).rglob("*"), reverse=True):
            item.unlink() if item.is_file() else item.rmdir()
        (tmp_path / subtask).rmdir()
    with pytest.raises(BenchmarkDataError, match=r"lacks the subtask folder\(s\) \['artwork', 'OCR'\]"):
        get_benchmark("mme", tmp_path).load()


def test_unknown_benchmark_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"--benchmark: unknown benchmark 'popee'; did you mean 'pope'\?"):
        get_benchmark("popee")


def test_textvqa_protocols_share_one_release_folder(tmp_path):
    write_fixture("textvqa", tmp_path)
    bench = get_benchmark("textvqa-ocr", tmp_path)
    assert bench.root == tmp_path / "textvqa" and bench.folder == "textvqa"
    assert "Reference OCR token: nikon, d90" in bench.prompt(bench.load()[0])


# ---------------------------------------------------------------------------- images the models cannot take
@pytest.mark.parametrize("kind", UNUSABLE)
def test_an_unusable_image_is_an_error_naming_the_question_and_the_file(tmp_path, kind):
    write_pope(tmp_path)
    data, words = UNUSABLE[kind]
    (tmp_path / "val2014" / "COCO_val2014_000000310196.jpg").write_bytes(data())
    sample = get_benchmark("pope", tmp_path).load()[0]
    with pytest.raises(BenchmarkDataError, match=rf"sample random/1: image .*COCO_val2014_000000310196\.jpg: "
                                                 rf"{re.escape(words)}"):
        sample.load_image()


def test_images_outside_the_benchmark_folder_are_read_only_when_allowed(tmp_path):
    write_pope(tmp_path / "pope")
    _image(tmp_path / "elsewhere" / "photo.jpg")
    path = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    path.write_text(path.read_text().replace("COCO_val2014_000000310196.jpg", "../../elsewhere/photo.jpg", 1))
    (tmp_path / "pope" / "val2014" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "photo.jpg")
    path = tmp_path / "pope" / "coco" / "coco_pope_popular.json"
    path.write_text(path.read_text().replace("COCO_val2014_000000310196.jpg", "linked.jpg", 1))
    with pytest.raises(BenchmarkDataError, match=r"coco_pope_random\.json: line 1: image .*val2014/\.\./\.\./elsewhere/"
                                                 r"photo\.jpg: a path outside the image root"):
        get_benchmark("pope", tmp_path).load()
    path = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    path.write_text(path.read_text().replace("../../elsewhere/photo.jpg", "COCO_val2014_000000310196.jpg"))
    with pytest.raises(BenchmarkDataError, match=r"coco_pope_popular\.json: line 1: image .*linked\.jpg: a symlink "
                                                 r"pointing outside the image root"):
        get_benchmark("pope", tmp_path).load()
    samples = get_benchmark("pope", tmp_path, allow_outside_root=True).load()
    assert samples[4].image.name == "linked.jpg" and samples[4].load_image().size == (8, 8)


def test_easy_vqa_questions_about_an_unusable_image_are_an_evaluation_error(monkeypatch, tmp_path):
    import easy_vqa

    paths = dict(easy_vqa.get_test_image_paths())
    (tmp_path / "dot.png").write_bytes(png((1, 1)))
    paths[0] = str(tmp_path / "dot.png")  # the package's data, one image replaced by a 1x1 file
    monkeypatch.setattr(easy_vqa, "get_test_image_paths", lambda: paths)
    with pytest.raises(BenchmarkDataError, match=r"easy-vqa: question easy-vqa/test/\d+: image .*dot\.png: 1x1 "
                                                 r"pixels is too small .*\(\d+ question\(s\) ask about images"):
        get_benchmark("easy-vqa").load()

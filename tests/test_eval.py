"""Answer normalisation, parsers and metrics: the known-answer cases of eval_benchmarks.md, and the easy-vqa table."""

import pytest
import torch

from zoo.eval import (
    FAILED,
    CircularAccuracy,
    ExactMatch,
    MMEScores,
    MultipleChoiceAccuracy,
    POPEScores,
    VQAAccuracy,
    accuracy_table,
    answer_type,
    exact_match,
    extract_choice,
    normalize_answer,
    parse_gqa,
    parse_mme,
    parse_pope,
    vqa_score,
)


# ---------------------------------------------------------------------------- VQA accuracy and normalisation
@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_vqa_score_by_number_of_matching_answers(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_score("cat", answers) == pytest.approx(expected)


def test_vqa_score_known_answers_after_normalisation():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_score("two", answers) == pytest.approx(0.9)  # "two" -> "2": 3 matches
    assert vqa_score("3", answers) == pytest.approx(1.0)
    assert vqa_score("4", answers) == 0.0


def test_official_vqav2_rule_normalises_only_when_the_answers_differ():
    # the official evaluator leaves the prediction raw when all 10 humans agree; LLaVA's m4c always normalises
    assert vqa_score("Yes", ["yes"] * 10, always_normalize=False) == 0.0
    assert vqa_score("Yes", ["yes"] * 10, always_normalize=True) == 1.0
    assert vqa_score("Yes", ["yes"] * 9 + ["no"], always_normalize=False) == pytest.approx(1.0)


@pytest.mark.parametrize("raw, normal", [
    ("The Dog.", "dog"),
    ("yes!", "yes"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("youre", "you're"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("5.", "5"),
    ("a, b", "b"),  # the comma touches a space: deleted; then the article goes
    ("red,blue", "red blue"),  # touching no space: replaced by a space
    ("1,000", "1000"),  # a comma between digits: every punctuation mark is deleted
    ("Hello-world", "hello world"),
    ("  a Circle. ", "circle"),
    ("The red one!", "red 1"),
    ("two\tdogs\n", "2 dogs"),
    ("an apple", "apple"),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_after_normalisation():
    assert exact_match(["Yes.", "the circle", "blue"], ["yes", "circle", "teal"]) == [True, True, False]
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_vqa_accuracy_metric_is_the_mean_score_in_percent():
    metric = VQAAccuracy()
    metric.update(["two", "cat"], [["2"] * 3 + ["3"] * 7, ["cat"] * 10])
    metric.update(["4"], [["4"] + ["5"] * 9])
    assert float(metric.compute()) == pytest.approx(100 * (0.9 + 1.0 + 0.3) / 3)
    with pytest.raises(ValueError, match="columns of different lengths"):
        metric.update(["a"], [])


# ---------------------------------------------------------------------------- parsers
@pytest.mark.parametrize("output, choice", [
    ("B", "B"), ("B.", "B"), ("B. dog", "B"), (" C ", "C"),
    ("The answer is B", FAILED), ("E", FAILED), ("b", FAILED), ("AB", FAILED), ("", FAILED),
])
def test_scienceqa_parser(output, choice):
    assert extract_choice(output, ["cat", "dog", "fish"]) == choice


def test_mmbench_parser_also_takes_an_options_text():
    options = ["red", "green", "blue"]
    assert extract_choice("Green.", options, match_text=True) == "B"
    assert extract_choice("Green.", options, match_text=False) == FAILED
    assert extract_choice("purple", options, match_text=True) == FAILED


@pytest.mark.parametrize("output, parsed", [
    ("No, there is not", "no"), ("There is a dog", "yes"), ("Yes", "yes"), ("no", "no"),
    ("Yes. But not a cat.", "yes"),  # only the first sentence counts
    ("NO", "yes"),  # LLaVA's rule is case-sensitive: "No", "no", "not"
])
def test_pope_parser(output, parsed):
    assert parse_pope(output) == parsed


def test_mme_and_gqa_parsers():
    assert [parse_mme(t) for t in ("Yes, it is.", " no", "Maybe")] == ["yes", "no", "other"]
    assert parse_gqa(" Red.") == "red"


# ---------------------------------------------------------------------------- POPE, MME, MMBench
def test_pope_scores_known_case():
    metric = POPEScores()
    metric.update(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    scores = {k: float(v) for k, v in metric.compute().items()}
    assert scores == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0,
                                    "yes_ratio": 50.0})
    never_yes = POPEScores()
    never_yes.update(["No", "No"], ["yes", "no"])
    assert float(never_yes.compute()["precision"]) == 0.0 and float(never_yes.compute()["f1"]) == 0.0
    with pytest.raises(ValueError, match=r"POPE labels: expected 'yes' or 'no', got \['maybe'\]"):
        metric.update(["yes"], ["maybe"])


def test_mme_known_case_acc_75_acc_plus_50_score_125():
    metric = MMEScores()
    # image a: both right; image b: the yes question right, the no question wrong
    metric.update(["Yes", "No", "Yes", "Yes"], ["yes", "no", "yes", "no"], ["count"] * 4, ["a", "a", "b", "b"])
    scores = {k: float(v) for k, v in metric.compute().items()}
    assert scores["count/acc"] == pytest.approx(75.0)
    assert scores["count/acc+"] == pytest.approx(50.0)
    assert scores["count"] == pytest.approx(125.0)
    assert scores["perception"] == pytest.approx(125.0) and scores["cognition"] == 0.0
    with pytest.raises(ValueError, match=r"MME subtask\(s\) \['counting'\]"):
        metric.update(["yes"], ["yes"], ["counting"], ["c"])


def _circular_passes(answers: list[str], options: list[str]):
    """Every rotation of 4-option questions whose original answers are ``answers``."""
    targets, option_lists, ids, rotations = [], [], [], []
    for index, answer in enumerate(answers):
        correct = options["ABCD".index(answer)]
        for rotation in range(4):
            rotated = options[rotation:] + options[:rotation]
            targets.append("ABCD"[rotated.index(correct)])
            option_lists.append(rotated)
            ids.append(index)
            rotations.append(rotation)
    return targets, option_lists, ids, rotations


def test_mmbench_circular_always_a_scores_zero_while_single_pass_gives_25():
    targets, options, ids, rotations = _circular_passes(["A", "B", "C", "D"], ["w", "x", "y", "z"])
    metric = CircularAccuracy()
    metric.update(["A"] * len(targets), targets, options, ids, rotations)
    scores = {k: float(v) for k, v in metric.compute().items()}
    assert scores == {"circular": 0.0, "single_pass": 25.0}
    oracle = CircularAccuracy()
    oracle.update(targets, targets, options, ids, rotations)
    assert float(oracle.compute()["circular"]) == 100.0
    one_slip = CircularAccuracy()  # a single wrong rotation fails its question
    one_slip.update(["B"] + targets[1:], targets, options, ids, rotations)
    assert float(one_slip.compute()["circular"]) == 75.0


def test_multiple_choice_accuracy_counts_failed_outputs():
    metric = MultipleChoiceAccuracy()
    metric.update(["B", "The answer is A", "E", "C."], ["B", "A", "C", "C"], [["p", "q", "r"]] * 4)
    scores = {k: float(v) for k, v in metric.compute().items()}
    assert scores == {"accuracy": 50.0, "failed": 50.0}


def test_exact_match_metric_with_a_benchmark_parser():
    metric = ExactMatch(normalize=parse_gqa)
    metric.update(["Yes.", "the red one", "left"], ["yes", "red", "left"])
    assert float(metric.compute()) == pytest.approx(200 / 3)


# ---------------------------------------------------------------------------- sync semantics
@pytest.mark.parametrize("make, columns", [
    (POPEScores, (["yes", "no", "no", "yes", "yes", "no"], ["yes", "no", "yes", "yes", "no", "no"])),
    (VQAAccuracy, (["cat", "2", "x", "dog"], [["cat"] * 10, ["two"] * 2 + ["3"] * 8, ["x"] * 10, ["cat"] * 10])),
    (lambda: MMEScores(), (["yes", "no", "yes", "yes"], ["yes", "no", "yes", "no"], ["OCR"] * 2 + ["scene"] * 2,
                           ["i", "i", "j", "j"])),
    (CircularAccuracy, (["A", "B", "A", "A"], ["A", "B", "A", "B"], [["p", "q"]] * 4, [0, 0, 1, 1], [0, 1, 0, 1])),
])
def test_metric_states_merge_like_the_cross_process_reduction(make, columns):
    """Rank-wise shards merged with the states' reduce functions (what a DDP sync applies) give the whole score;
    the shards are interleaved as the harness shards (every second question)."""
    whole, rank0, rank1 = make(), make(), make()
    whole.update(*columns)
    rank0.update(*(c[0::2] for c in columns))
    rank1.update(*(c[1::2] for c in columns))
    rank0.merge_state(rank1)

    def values(m):
        out = m.compute()
        return {k: float(v) for k, v in out.items()} if isinstance(out, dict) else float(out)

    assert values(rank0) == pytest.approx(values(whole))


def test_metrics_reset_between_evaluations():
    metric = POPEScores()
    metric.update(["yes"], ["no"])
    metric.reset()
    metric.update(["yes"], ["yes"])
    assert float(metric.compute()["accuracy"]) == 100.0
    assert isinstance(metric.compute()["f1"], torch.Tensor)


# ---------------------------------------------------------------------------- easy-vqa table
def test_accuracy_table_per_type_and_majority_baseline():
    refs = ["yes", "no", "red", "circle", "yes", "triangle"]
    preds = ["yes", "yes", "red", "square", "yes", "triangle"]
    table = accuracy_table(preds, refs, train_answers=["no", "no", "yes"])
    assert table["overall"] == pytest.approx(4 / 6)
    assert table["yes/no"] == pytest.approx(2 / 3)
    assert table["colour"] == 1.0 and table["shape"] == 0.5
    assert table["majority baseline"] == pytest.approx(1 / 6)  # "no" is the train majority
    assert answer_type("teal") == "colour"
    with pytest.raises(ValueError, match="'square' is not an easy-vqa answer"):
        answer_type("square")


def test_count_by_type():
    from zoo.eval import count_by_type

    assert count_by_type(["yes", "red", "no", "circle"]) == {"colour": 1, "shape": 1, "yes/no": 2}

"""Answer normalisation and the easy-vqa accuracy table (closed-form cases)."""

import pytest

from zoo.eval import accuracy_table, answer_type, exact_match, normalize_answer


@pytest.mark.parametrize("raw, normal", [
    ("Yes", "yes"),
    ("  a Circle. ", "circle"),
    ("The red one!", "red 1"),  # number words become digits, as in the official VQA evaluation
    ("two", "2"),
    ("3.5", "3.5"),
    ("rectangle,", "rectangle"),
    ("an apple", "apple"),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_after_normalisation():
    assert exact_match(["Yes.", "the circle", "blue"], ["yes", "circle", "teal"]) == [True, True, False]
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


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

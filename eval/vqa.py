"""The official VQA answer normalisation, the VQA accuracy of one answer, and the easy-vqa accuracy table.

The normalisation follows the VQA evaluation code (and the m4c ``EvalAIAnswerProcessor`` LLaVA uses for TextVQA):
punctuation is deleted where it touches a space (or anywhere when the text holds a comma between digits) and
replaced by a space elsewhere; a period is kept only before a digit; number words become digits; articles go;
contractions written without their apostrophe get it back.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
# The official pattern, lookahead typo included: "(?!<=\d)" is a lookahead, so a period survives only when a digit
# follows it ("3.5", ".5"); "5." loses it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# Contractions the table restores. A form whose apostrophe-less spelling is an English word (its, well, were, hell,
# ill, shed, wed, lets) is left out, as in the official table. Keys: the form without its apostrophe; for a double
# contraction, the forms missing either one of its two apostrophes.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all you'd you'd've you'll you're you've"
).split()


def _contraction_keys(word: str) -> list[str]:
    marks = [i for i, c in enumerate(word) if c == "'"]
    if len(marks) == 1:
        return [word.replace("'", "")]
    return [word[:i] + word[i + 1:] for i in marks]


# "i'm" / "i've" / "i'd've" are written "Im" / "Ive" / "Id've" in the official table, which it looks up after
# lower-casing: they never match, so they are not restored here either.
_CONTRACTIONS = {key: word for word in _CONTRACTED if not word.startswith("i'") for key in _contraction_keys(word)}


def clean_answer(answer: str) -> str:
    """Newlines and tabs become spaces, surrounding space goes (the part the official evaluator always applies)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        touching_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if touching_space or delete_all else " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation: ``"The Dog."`` -> ``"dog"``, ``"two"`` -> ``"2"``, ``"dont"`` -> ``"don't"``,
    ``"3.5"`` keeps its period, ``"1,000"`` -> ``"1000"``."""
    words = []
    for word in _punctuation(clean_answer(answer).lower()).split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str], always_normalize: bool = True) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2 / TextVQA / VizWiz).

    The mean over the leave-one-out subsets of ``min(1, matches among the others / 3)``: with 10 answers of which
    n equal the prediction, 0 / 0.3 / 0.6 / 0.9 / 1.0 for n = 0 / 1 / 2 / 3 / >= 4. ``always_normalize=False`` is
    the official VQAv2 evaluator, which normalises only when the human answers are not all the same;
    ``True`` is LLaVA's TextVQA evaluator (m4c), which always does.
    """
    if not answers:
        raise ValueError("vqa_score: no reference answers")
    prediction, answers = clean_answer(prediction), [clean_answer(a) for a in answers]
    if always_normalize or len(set(answers)) > 1:
        prediction, answers = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    if len(answers) == 1:
        return float(answers[0] == prediction)
    matches = sum(a == prediction for a in answers)
    # leaving out answer i removes one match exactly when answer i is itself a match
    return sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers) / len(answers)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per-question exact match after :func:`normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]


EASY_VQA_TYPES = {
    "colour": {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"},
    "shape": {"circle", "rectangle", "triangle"},
    "yes/no": {"yes", "no"},
}


def answer_type(answer: str) -> str:
    """easy-vqa answer type of a reference answer: colour, shape or yes/no."""
    for name, answers in EASY_VQA_TYPES.items():
        if answer in answers:
            return name
    raise ValueError(f"answer {answer!r} is not an easy-vqa answer")


def count_by_type(references: Sequence[str]) -> dict[str, int]:
    """Number of reference answers of each easy-vqa answer type."""
    counts = Counter(answer_type(r) for r in references)
    return {name: counts[name] for name in EASY_VQA_TYPES}


def accuracy_table(predictions: Sequence[str], references: Sequence[str],
                   train_answers: Sequence[str]) -> dict[str, float]:
    """Overall and per-answer-type accuracy, plus the majority-answer baseline (most frequent train answer)."""
    hits = exact_match(predictions, references)
    table = {"overall": sum(hits) / len(hits)}
    for name in EASY_VQA_TYPES:
        rows = [h for h, r in zip(hits, references) if answer_type(r) == name]
        table[name] = sum(rows) / len(rows) if rows else float("nan")
    majority = Counter(train_answers).most_common(1)[0][0]
    table["majority baseline"] = sum(r == majority for r in references) / len(references)
    return table

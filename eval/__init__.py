"""Evaluation (``zoo.eval``): answer normalisation and accuracy."""

from .vqa import accuracy_table, answer_type, count_by_type, exact_match, normalize_answer

__all__ = ["accuracy_table", "answer_type", "count_by_type", "exact_match", "normalize_answer"]

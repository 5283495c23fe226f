"""Scores of generated text against a reference answer: exact match, accuracy of the first
word (labels such as yes/no), and SQuAD-style token F1, all on SQuAD-normalised text."""

from __future__ import annotations

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD evaluation's rule)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def first_word_accuracy(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split()[:1], normalize(reference).split()[:1]
    return float(predicted == expected)


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {"examples": n,
            "exact_match": sum(map(exact_match, predictions, references)) / n,
            "accuracy": sum(map(first_word_accuracy, predictions, references)) / n,
            "token_f1": sum(map(token_f1, predictions, references)) / n}

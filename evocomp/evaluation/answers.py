"""When a generated answer counts as correct: the one rule every accuracy figure uses."""

from __future__ import annotations


def normalise(answer: str) -> str:
    """Case, surrounding space and a final full stop do not matter: ``" Red."`` -> ``"red"``."""
    return answer.strip().lower().rstrip(".").strip()


def is_correct(generated: str, expected: str) -> bool:
    """Exact match after :func:`normalise` on both sides."""
    return normalise(generated) == normalise(expected)

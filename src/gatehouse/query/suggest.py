"""The closest name to a misspelt one, scored as PostgREST scores it, for "Perhaps you meant ..." hints.

PostgREST finds its suggestions with a *fuzzy set* (the ``fuzzyset`` library, a port of fuzzyset.js): names are
lowercased and stripped to letters, digits, spaces and commas, padded with ``-``, and cut into n-grams of 3
(then 2, when 3 finds nothing); the names sharing grams with the misspelt one are ranked by the cosine of their
gram counts, and the best 50 are scored again by edit distance, ``1 - levenshtein / longer length``. A name
must score at least :data:`MIN_SCORE`; an exact match (case aside) is returned alone with score 1.

The candidates are only ever names the caller may see: the caller passes them in.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

MIN_SCORE = 0.33
GRAM_SIZES = (3, 2)
RESCORED = 50


def _normalized(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum() or c in " ,")


def _grams(name: str, size: int) -> Counter[str]:
    padded = f"-{_normalized(name)}-"
    padded += "-" * max(0, size - len(padded))
    return Counter(padded[i:i + size] for i in range(len(padded) - size + 1))


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _similarity(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1 - _levenshtein(a, b) / longest


def _cosine(a: Counter[str], b: Counter[str]) -> float:
    dot = sum(count * b[gram] for gram, count in a.items() if gram in b)
    norms = math.sqrt(sum(c * c for c in a.values())) * math.sqrt(sum(c * c for c in b.values()))
    return dot / norms if norms else 0.0


def ranked(name: str, candidates: Iterable[str], min_score: float = MIN_SCORE) -> list[tuple[float, str]]:
    """``(score, candidate)`` of the candidates close enough to ``name``, best first."""
    choices = list(dict.fromkeys(candidates))
    key = name.lower()
    exact = next((c for c in choices if c.lower() == key), None)
    if exact is not None:
        return [(1.0, exact)]
    for size in GRAM_SIZES:
        wanted = _grams(name, size)
        shared = [(score, c) for c in choices if (score := _cosine(wanted, _grams(c, size))) > 0]
        if not shared:
            continue
        shared.sort(key=lambda pair: -pair[0])
        rescored = sorted(((_similarity(key, c.lower()), c) for _, c in shared[:RESCORED]), key=lambda pair: -pair[0])
        return [(score, c) for score, c in rescored if score >= min_score]
    return []


def closest_other(name: str, candidates: Iterable[str]) -> str | None:
    """The best candidate that is not ``name`` itself, or None (none close enough, or ``name`` is one of them)."""
    return next((c for score, c in ranked(name, candidates) if score < 1.0), None)


# --- PostgreSQL's hint for a missing column ------------------------------------------------------------------

MAX_COLUMN_DISTANCE = 3
"""PostgreSQL's ``MAX_FUZZY_DISTANCE``: a column further than this many edits is never suggested."""


def close_columns(name: str, columns: Iterable[str]) -> tuple[str, ...]:
    """The columns PostgreSQL's "Perhaps you meant to reference the column ..." hint names for ``name`` (its
    ``errorMissingColumn``, which PostgREST passes on), among ``columns``: one, two, or none.

    Its rule: a column at most :data:`MAX_COLUMN_DISTANCE` edits away (case counts), and at most half the typed
    name's length (in bytes, rounded down); the closest wins; two at the same distance are both named; a third
    at that distance means none is (the bar was too low), unless a closer one turns up later."""
    bar = MAX_COLUMN_DISTANCE + 1
    found: list[str] = []
    half = len(name.encode()) // 2
    for column in columns:
        if not column or column == name:
            continue
        distance = _levenshtein(column, name)
        if distance > half or distance > bar:
            continue
        if distance < bar:
            bar, found = distance, [column]
        elif len(found) == 1:
            found.append(column)
        else:  # a third at the same distance (or none kept at it): no hint at this distance
            found = []
    return tuple(found)


def missing_column_hint(relation: str, name: str, columns: Iterable[str]) -> str | None:
    """PostgreSQL's hint for a reference to ``relation.name`` that does not exist, or None."""
    near = close_columns(name, columns)
    if not near:
        return None
    named = " or the column ".join(f'"{relation}.{column}"' for column in near)
    return f"Perhaps you meant to reference the column {named}."

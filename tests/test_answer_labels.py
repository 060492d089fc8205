"""Attribute answers as a real VLM writes them -> the label (issue 19 part 5).

tests/data/attribute_answers.jsonl was written by hand, as an annotator would, BEFORE the label
reader was changed: realistic Qwen2-VL answers (sentences, lead-ins, markdown, lists, quotes,
hedges, refusals) to the three attribute questions, each with the labels that count as right
(``accept``; null = no label can be read, the row must be rejected).
"""

from __future__ import annotations

import json
from pathlib import Path

from pab_build.models import attributes

CORPUS = Path(__file__).parent / "data" / "attribute_answers.jsonl"


def _corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(read) -> tuple[float, list]:
    """Share of corpus answers where ``read(question, answer)`` gives an accepted label (or None
    for a refusal), and the misses."""
    rows, wrong = _corpus(), []
    for r in rows:
        got = read(r["question"], r["answer"])
        ok = got is None if r["accept"] is None else got in r["accept"]
        if not ok:
            wrong.append((r["answer"], got, r["accept"]))
    return 1 - len(wrong) / len(rows), wrong


def _old_parser(question: str, answer: str) -> str | None:
    return attributes.normalise_answer(answer, max_words=6) or None


def test_corpus_covers_the_three_questions_and_refusals():
    rows = _corpus()
    assert len(rows) >= 80
    for q in ("action", "anomaly", "scene"):
        mine = [r for r in rows if r["question"] == q]
        assert len(mine) >= 25 and sum(r["accept"] is None for r in mine) >= 4, q


def test_first_clause_parser_score_is_recorded():
    # the first-clause normaliser the stages used before answer_label: 31 of 125 (24.8 %)
    acc, wrong = score(_old_parser)
    print(f"normalise_answer: {acc:.1%} ({len(wrong)} wrong)")
    assert acc < 0.5

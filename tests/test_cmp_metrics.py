"""Retrieval metrics against hand-computed cases (several true matches per query, ties)."""

from __future__ import annotations

import pytest

from pab_build.cmp.metrics import retrieval_metrics


def test_two_queries_with_several_true_matches():
    gallery = ["a", "b", "a", "c", "b"]
    scores = [
        [0.9, 0.8, 0.1, 0.7, 0.5],  # ranking a b c b a -> matches at ranks 1, 5
        [0.5, 0.2, 0.9, 0.6, 0.7],  # ranking a b c a b -> matches at ranks 2, 5
    ]
    m = retrieval_metrics(scores, ["a", "b"], gallery)
    # AP: (1/1 + 2/5)/2 = 0.7 and (1/2 + 2/5)/2 = 0.45; INP: 2/5 and 2/5
    assert m == pytest.approx({"r1": 50.0, "r5": 100.0, "r10": 100.0, "mAP": 57.5, "mINP": 40.0})


def test_recall_at_k_counts_the_first_true_match():
    gallery = list("xxxxxxaxxxxa")  # true matches of "a" at gallery positions 6 and 11
    scores = [[12 - j for j in range(12)]]  # gallery order is the ranking
    m = retrieval_metrics(scores, ["a"], gallery)
    assert (m["r1"], m["r5"], m["r10"]) == (0.0, 0.0, 100.0)
    assert m["mAP"] == pytest.approx(100 * (1 / 7 + 2 / 12) / 2)
    assert m["mINP"] == pytest.approx(100 * 2 / 12)


def test_ties_keep_gallery_order():
    m = retrieval_metrics([[1.0, 1.0, 1.0]], ["a"], ["b", "a", "a"])
    assert m["r1"] == 0.0
    assert m["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert m["mINP"] == pytest.approx(100 * 2 / 3)


def test_identity_ids_make_more_matches_than_exact_keys():
    keys, ids = ["k1", "k2", "k3"], ["p", "p", "q"]
    scores = [[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]  # the two p-captions swap their images
    assert retrieval_metrics(scores, keys, keys)["r1"] == pytest.approx(100 / 3)
    assert retrieval_metrics(scores, ids, ids)["r1"] == 100.0


def test_query_without_true_match_is_an_error():
    with pytest.raises(ValueError, match="no true match"):
        retrieval_metrics([[0.1, 0.2]], ["z"], ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics([[0.1, 0.2]], ["a", "b"], ["a", "b"])

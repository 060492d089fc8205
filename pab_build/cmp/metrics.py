"""Text-to-image retrieval metrics: R@1/5/10, mAP and mINP in percent (the CMP / APTM definitions).

For query i the gallery is ranked by descending score; equal scores keep gallery order (stable
sort), so results never depend on the sort implementation. Gallery item j is a true match of
query i when ``gallery_ids[j] == query_ids[i]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def retrieval_metrics(scores, query_ids: Sequence, gallery_ids: Sequence) -> dict[str, float]:
    """``scores`` (num queries, num gallery) -> {"r1", "r5", "r10", "mAP", "mINP"} in percent.

    R@k: share of queries with a true match in the top k. AP: mean of precision at each true
    match's rank. INP: (number of true matches) / (rank of the last true match). Every query needs
    at least one true match in the gallery (a query without one is an error, not a silent 0).
    """
    scores = np.asarray(scores, dtype=np.float64)
    q_ids, g_ids = np.asarray(query_ids, dtype=object), np.asarray(gallery_ids, dtype=object)
    if scores.ndim != 2 or scores.shape != (len(q_ids), len(g_ids)):
        raise ValueError(f"scores shape {scores.shape} does not match {len(q_ids)} queries x {len(g_ids)} gallery items")
    if not len(q_ids):
        raise ValueError("no queries")
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, G), best first
    matches = g_ids[order] == q_ids[:, None]  # (Q, G) bool
    n_true = matches.sum(1)
    if (n_true == 0).any():
        bad = [str(q_ids[i]) for i in np.flatnonzero(n_true == 0)[:5]]
        raise ValueError(f"{int((n_true == 0).sum())} queries have no true match in the gallery, e.g. {bad}")
    ranks = np.arange(1, matches.shape[1] + 1)
    hits = np.cumsum(matches, axis=1)  # true matches within the top r
    first = matches.argmax(1) + 1  # rank of the first true match
    last = matches.shape[1] - matches[:, ::-1].argmax(1)  # rank of the last true match
    ap = (hits / ranks * matches).sum(1) / n_true
    inp = n_true / last
    return {
        "r1": float((first <= 1).mean() * 100),
        "r5": float((first <= 5).mean() * 100),
        "r10": float((first <= 10).mean() * 100),
        "mAP": float(ap.mean() * 100),
        "mINP": float(inp.mean() * 100),
    }

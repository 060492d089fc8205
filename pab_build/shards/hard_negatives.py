"""Identity hard negatives for CMP's IHNM (paper 4.2, issue 4 item 5).

For each training image we pick one image of the *same identity* (the OOPS! clip, ``clip_key``)
generated from the counterpart caption: a normal image (kind ``n``) gets an anomaly image
(``a`` or ``a+``), an anomaly image gets a normal one. The choice is a pure function of the
samples, so two builds pick the same links:

- an ``n`` image with an even index looks at kind ``a`` first, an odd index at ``a+`` first, so
  normal images spread their negatives over both anomaly captions;
- within the chosen kind, the image with the same index if there is one, else the candidate at
  position ``index % len(candidates)`` (candidates sorted by index, then key).

Only the samples passed in are candidates: the caller passes exactly the samples that will be in
the training shards, so every link resolves. An image whose identity has no image of the other
behavior gets ``None``; the shard stage then rejects it ("no counterpart image of the same
identity") rather than shipping it without a negative: CMP's IHNM needs one for every sample and
the official training data always has one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KINDS = ("n", "a", "a+")
BEHAVIOR_OF_KIND = {"n": "normal", "a": "anomaly", "a+": "anomaly"}
# where a kind looks for its negative, in order of preference (n's order flips with index parity)
COUNTERPART_KINDS = {"n": ("a", "a+"), "a": ("n",), "a+": ("n",)}


def behavior_of_kind(kind: str) -> str:
    try:
        return BEHAVIOR_OF_KIND[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}") from None


def choose_hard_negatives(samples: list[dict]) -> dict[str, str | None]:
    """``{sample_key: hard negative sample_key or None}`` for samples with ``sample_key``,
    ``clip_key`` (identity), ``kind`` (n / a / a+) and ``index``."""
    keys = [s["sample_key"] for s in samples]
    rows = hard_negative_rows(pa.array([s["clip_key"] for s in samples], pa.string()),
                              pa.array([s["kind"] for s in samples], pa.string()),
                              pa.array([int(s["index"]) for s in samples], pa.int64()),
                              pa.array(keys, pa.string()))
    return {key: None if r < 0 else keys[r] for key, r in zip(keys, rows.tolist())}


def hard_negative_rows(clip_keys, kinds, indexes, sample_keys) -> np.ndarray:
    """The rule above over Arrow columns (a million samples, no per-row Python): for each sample,
    the row number of its hard negative, or -1. Candidates are ordered by (index, sample_key)."""
    clip_keys, kinds, indexes, sample_keys = (c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
                                              for c in (clip_keys, kinds, indexes, sample_keys))
    n = len(sample_keys)
    kinds = pc.cast(kinds, pa.string())
    known = pc.is_in(kinds, value_set=pa.array(KINDS, pa.string())).to_numpy(zero_copy_only=False)
    if not known.all():
        behavior_of_kind(kinds[int(np.argmin(known))].as_py())  # raises for the first unknown kind
    if pc.any(pc.is_null(indexes)).as_py():
        raise TypeError("a sample has no index")
    kind = pc.index_in(kinds, value_set=pa.array(KINDS, pa.string())).to_numpy(zero_copy_only=False).astype(np.int64)
    index = pc.cast(indexes, pa.int64()).to_numpy(zero_copy_only=False)
    clip = pc.dictionary_encode(pc.cast(clip_keys, pa.string())).indices
    clip = pc.fill_null(clip, -1).to_numpy(zero_copy_only=False).astype(np.int64)  # a missing identity is one
    key_rank = np.empty(n, np.int64)
    key_rank[pc.sort_indices(sample_keys).to_numpy()] = np.arange(n)  # Arrow's byte order = Python's str order
    # one sorted integer per (identity, kind, index): groups and same-index runs are ranges of it
    index_values, index_rank = np.unique(index, return_inverse=True)
    m = max(len(index_values), 1)
    code = (clip * len(KINDS) + kind) * m + index_rank.reshape(-1)
    order = np.lexsort((key_rank, code))
    sorted_code = code[order]

    def negatives(want: np.ndarray) -> np.ndarray:  # -1 where the identity has no image of kind ``want``
        group = (clip * len(KINDS) + want) * m
        lo, hi = np.searchsorted(sorted_code, group), np.searchsorted(sorted_code, group + m)
        size = hi - lo
        pick = lo + np.mod(index, np.maximum(size, 1))
        same = np.searchsorted(sorted_code, group + index_rank)
        has_same = same < hi
        has_same[has_same] = sorted_code[same[has_same]] == (group + index_rank)[has_same]
        pick = np.where(has_same, same, pick)
        return np.where(size > 0, order[np.minimum(pick, max(n - 1, 0))], -1)

    n_kind, a_kind, ap_kind = (KINDS.index(k) for k in ("n", "a", "a+"))
    normal, odd = kind == n_kind, np.mod(index, 2) == 1
    first = np.where(normal, np.where(odd, ap_kind, a_kind), n_kind)
    second = np.where(odd, a_kind, ap_kind)  # only normal images have a second choice
    chosen = negatives(first)
    fallback = normal & (chosen < 0)
    if fallback.any():
        chosen[fallback] = negatives(second)[fallback]
    return chosen

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
    by_identity_kind: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for s in samples:
        behavior_of_kind(s["kind"])  # validates the kind
        by_identity_kind.setdefault((s["clip_key"], s["kind"]), []).append((int(s["index"]), s["sample_key"]))
    for cands in by_identity_kind.values():
        cands.sort()

    links: dict[str, str | None] = {}
    for s in samples:
        index = int(s["index"])
        order = COUNTERPART_KINDS[s["kind"]]
        if s["kind"] == "n" and index % 2 == 1:
            order = order[::-1]
        links[s["sample_key"]] = None
        for kind in order:
            cands = by_identity_kind.get((s["clip_key"], kind))
            if cands:
                same_index = [key for i, key in cands if i == index]
                links[s["sample_key"]] = same_index[0] if same_index else cands[index % len(cands)][1]
                break
    return links

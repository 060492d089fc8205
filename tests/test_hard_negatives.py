"""Identity hard negatives: the choice rule, and the links in the training shards."""

from __future__ import annotations

import random

import pytest
from test_shards import shard_paths, write_train_build

from pab_build.shards import writer as shard_writer
from pab_build.shards.hard_negatives import behavior_of_kind, choose_hard_negatives
from pab_build.manifests import OK, REJECTED, read_manifest
from pab_build.oops import clip_key
from pab_build.stages import train_shards as train_shards_stage
from pab_build.engine.units import run_stage

CODES = {"n": "n", "a": "a", "a+": "ap"}


def samples_for(identity: str, counts: dict[str, int], skip: tuple[str, ...] = ()) -> list[dict]:
    out = []
    for kind, n in counts.items():
        for i in range(n):
            key = f"{identity}-{CODES[kind]}-{i:03d}"
            if key not in skip:
                out.append({"sample_key": key, "clip_key": identity, "kind": kind, "index": i})
    return out


def test_links_stay_within_identity_and_cross_behavior():
    samples = samples_for("c1", {"n": 4, "a": 3, "a+": 2}) + samples_for("c2", {"n": 1, "a+": 1})
    by_key = {s["sample_key"]: s for s in samples}
    links = choose_hard_negatives(samples)
    assert set(links) == set(by_key)
    for key, neg in links.items():
        assert neg in by_key and neg != key
        assert by_key[neg]["clip_key"] == by_key[key]["clip_key"]
        assert behavior_of_kind(by_key[neg]["kind"]) != behavior_of_kind(by_key[key]["kind"])


def test_choice_is_deterministic_prefers_the_same_index_and_spreads_normals():
    samples = samples_for("c1", {"n": 4, "a": 3, "a+": 2})
    links = choose_hard_negatives(samples)
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    assert choose_hard_negatives(shuffled) == links
    # n: even index -> a first, odd -> a+ first; same index when present, else index % count
    assert links["c1-n-000"] == "c1-a-000"
    assert links["c1-n-001"] == "c1-ap-001"
    assert links["c1-n-002"] == "c1-a-002"
    assert links["c1-n-003"] == "c1-ap-001"  # no a+ 003: index 3 % 2 = 1
    assert links["c1-a-002"] == "c1-n-002" and links["c1-ap-000"] == "c1-n-000"
    # a missing same-index image falls back deterministically, and falls back to the other kind
    thin = samples_for("c1", {"n": 3, "a": 1}, skip=("c1-n-000",))
    got = choose_hard_negatives(thin)
    assert got["c1-a-000"] == "c1-n-001"  # candidates [n-001, n-002]; 0 % 2 = 0
    assert got["c1-n-001"] == "c1-a-000"  # odd wants a+, there is none: a


def test_no_counterpart_gives_none_and_a_bad_kind_is_an_error():
    links = choose_hard_negatives(samples_for("c1", {"n": 2}) + samples_for("c2", {"a+": 1}))
    assert set(links.values()) == {None}
    with pytest.raises(ValueError, match="kind 'b'"):
        choose_hard_negatives([{"sample_key": "k", "clip_key": "c", "kind": "b", "index": 0}])


def test_every_shipped_link_points_at_a_shipped_sample_of_the_same_identity_and_other_behavior(ctx):
    ctx.cfg.shards.max_samples_per_shard = 4
    ck_full, ck_lonely, ck_drop = clip_key("full"), clip_key("lonely"), clip_key("dropped")
    write_train_build(
        ctx.store,
        {"full": {"n": 3, "a": 2, "a+": 2}, "lonely": {"n": 2}, "dropped": {"n": 1, "a": 1}},
        # the only anomaly image of "dropped" fails gen_pose: its normal image then has no negative
        rejected_at={f"{ck_drop}-a-000": "gen_pose"},
    )
    ctx.store.remove(f"generate/{ck_full}-a/{ck_full}-a-000.jpg")  # not shippable: no one's negative
    run_stage(ctx, train_shards_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "train_shards")}
    for key in (f"{ck_lonely}-n-000", f"{ck_lonely}-n-001", f"{ck_drop}-n-000"):
        assert rows[key]["status"] == REJECTED
        assert rows[key]["reason"] == "no counterpart image of the same identity"
    assert rows[f"{ck_full}-a-000"]["reason"] == f"file missing: generate/{ck_full}-a/{ck_full}-a-000.jpg"

    samples = {s["__key__"]: s for s in shard_writer.iter_shard_samples(shard_paths(ctx, "train"))}
    assert sorted(samples) == sorted(k for k, r in rows.items() if r["status"] == OK)
    assert len(samples) == 6 and len(shard_paths(ctx, "train")) == 2
    for key, s in samples.items():
        neg_key = s["json"]["hard_negative_key"]
        assert neg_key in samples, f"{key} -> {neg_key} is not a shipped sample"
        neg = samples[neg_key]["json"]
        assert neg["identity"] == s["json"]["identity"]
        assert neg["behavior"] != s["json"]["behavior"]
        assert s["json"]["hard_negative_caption"] == samples[neg_key]["txt"]
    assert samples[f"{ck_full}-n-000"]["json"]["hard_negative_key"] == f"{ck_full}-a-001"  # a-000 is gone


def _dict_rule(samples: list[dict]) -> dict[str, str | None]:
    """The rule as first written, one sample at a time: the oracle of the Arrow form."""
    by_identity_kind: dict[tuple, list[tuple[int, str]]] = {}
    for s in samples:
        by_identity_kind.setdefault((s["clip_key"], s["kind"]), []).append((int(s["index"]), s["sample_key"]))
    for cands in by_identity_kind.values():
        cands.sort()
    links: dict[str, str | None] = {}
    for s in samples:
        index, order = int(s["index"]), {"n": ("a", "a+"), "a": ("n",), "a+": ("n",)}[s["kind"]]
        if s["kind"] == "n" and index % 2 == 1:
            order = order[::-1]
        links[s["sample_key"]] = None
        for kind in order:
            if cands := by_identity_kind.get((s["clip_key"], kind)):
                same = [key for i, key in cands if i == index]
                links[s["sample_key"]] = same[0] if same else cands[index % len(cands)][1]
                break
    return links


@pytest.mark.parametrize("seed", range(5))
def test_the_arrow_choice_equals_the_rule_one_sample_at_a_time(seed):
    rng = random.Random(seed)
    samples = []
    for i in range(rng.randrange(1, 400)):
        samples.append({"sample_key": f"{rng.choice('aZé_')}{rng.randrange(10**4)}-{i}",
                        "clip_key": rng.choice([None, "c0", "c1", "c2", "é3", ""]), "kind": rng.choice(["n", "a", "a+"]),
                        "index": rng.choice([rng.randrange(5), rng.randrange(-3, 80)])})
    rng.shuffle(samples)
    assert choose_hard_negatives(samples) == _dict_rule(samples)
    assert choose_hard_negatives([]) == {}

"""Subject filter (paper 3.2) and the prompts stage (C_n / C_a / C_a+ with identity links)."""

from __future__ import annotations

import json
import os

import pytest

from pab_build.config import load_config
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.oops import clip_key
from pab_build.stages import prompts as prompts_stage
from pab_build.stages.prompts import STAGE as PROMPTS_STAGE
from pab_build.text import subjects, wordnet, words
from pab_build.text.subjects import analyse_subject, find_subject, is_person_subject
from pab_build.engine.units import Context, run_stage

DATA = os.path.join(os.path.dirname(__file__), "data")


def _labelled(name: str) -> list[tuple[bool, str, list | None]]:
    rows = []
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            rows.append((parts[0] == "1", parts[1], json.loads(parts[2]) if len(parts) > 2 and parts[2] else None))
    return rows


def _accuracy(name: str) -> tuple[float, list[str]]:
    rows = _labelled(name)
    wrong = [f"{cap!r}: gold {gold}" for gold, cap, svos in rows if is_person_subject(cap, svos) != gold]
    return 1 - len(wrong) / len(rows), wrong


def _require_wordnet():
    if not wordnet.available():
        message = "WordNet is not installed: python -m pab_build.text.wordnet (make install does it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


# heldout2 was written and committed (0834c74) before the filter using WordNet first ran on it: 97.4 %
# on that first run (one label fixed since, one parser bug), 190/194 now; the misses are words WordNet
# 3.0 lacks (barista, streamer, YouTuber) and a name that is also a common word ("Mike")
# heldout3 (issue 19) was committed before the filter learnt pronoun evidence, agent-noun morphology and
# bare-name subjects: 128/151 (84.8 %) then, 148/151 (98.0 %) after; the misses are names whose first
# WordNet sense is an event or a light ray ("Pat misses", "Ray gets hit") and a noun-verb compound
# ("the swimmer belly flops")
@pytest.mark.parametrize("name", ["subject_captions_heldout.tsv", "subject_captions_tune.tsv",
                                  "subject_captions_heldout2.tsv", "subject_captions_heldout3.tsv"])
def test_subject_filter_accuracy_on_labelled_captions(name):
    _require_wordnet()
    rows = _labelled(name)
    assert len(rows) >= 150 and 0.3 < sum(g for g, _, _ in rows) / len(rows) < 0.7  # both classes well represented
    accuracy, wrong = _accuracy(name)
    print(f"\nsubject filter accuracy on {name}: {accuracy:.3f} ({len(rows) - len(wrong)}/{len(rows)})")
    assert accuracy >= 0.97, wrong


def test_held_out_captions_differ_from_the_tuning_captions():
    tune = {cap.lower() for _, cap, _ in _labelled("subject_captions_tune.tsv")}
    assert not [cap for _, cap, _ in _labelled("subject_captions_heldout.tsv") if cap.lower() in tune]


@pytest.mark.parametrize("caption, subject, person", [
    ("a man is riding a bike down a ramp", "man", True),
    ("girl tries to jump over a fence", "girl", True),
    ("the dog knocks over the kid", "dog", False),
    ("he falls off the ladder", "he", True),
    ("two kids are playing", "kids", True),
    ("Don't know", None, False),
    ("a man and his son go fishing", "man and son", True),
    ("a group of people dance on a boat", "people", True),
    ("the guy in red slips", "guy", True),
    ("his phone falls into the pool", "phone", False),
    ("the man's wife slips", "wife", True),
    ("the ladder falls over", "ladder", False),
    ("the trailer comes loose", "trailer", False),
    ("trying to jump over the fence", None, False),
    ("it rolls away", "it", False),
    ("The Bride   dances.", "bride", True),
    ("a 5-year-old falls off the couch", "5-year-old", True),
    ("while skiing, a snowboarder crashes into him", "snowboarder", True),
])
def test_subject_and_person_decision(caption, subject, person):
    assert find_subject(caption) == subject
    assert is_person_subject(caption) is person


def test_annotation_triples_win_over_the_text_and_pronoun_placeholders_fall_back():
    assert is_person_subject("the man falls", [["dog", "fall", ""]]) is False  # the annotation's parse
    assert find_subject("a dog chases a ball", [["snowboarder", "jump", "ramp"]]) == "snowboarder"
    assert find_subject("he jumps in the pool", [["-PRON-", "jump", "pool"]]) == "he"  # spaCy 2 lemma
    assert find_subject("a group of kids dance", [["group", "dance", ""]]) == "kids"
    assert find_subject("the cat sleeps", [["", "sleep", ""]]) == "cat"  # empty subject: the text decides
    assert find_subject("a man runs", []) == "man"


def test_reasons_name_what_is_wrong():
    assert analyse_subject("the dog knocks over the kid").problem == "subject 'dog' is not a person"
    assert analyse_subject("  ").problem == "empty caption"
    assert analyse_subject("Don't know").problem.startswith("no usable caption")
    assert analyse_subject("riding a bike").problem.startswith("no subject found")
    assert analyse_subject("a man rides a bike").problem is None


@pytest.mark.parametrize("caption, person", [
    ("The streamer falls off his chair", True),  # WordNet's streamer is a ribbon; "his" refers back
    ("The streamer falls off the pole", False),  # no evidence: WordNet's ribbon
    ("A YouTuber tries a backflip", True),  # WordNet lacks the word; agent-noun ending
    ("The airfryer catches fire", False),  # lacks it too, but the lexicon lists it as a machine
    ("The trailer rolls into his car", False),  # a machine by its first sense, whatever "his" says
    ("The dog jumps onto her owner", False),  # an animal, whatever "her" says
    ("Rose falls off the swing", True),  # a bare singular noun before a verb: a name
    ("Water sprays out of the hose", False),  # a mass noun
    ("Dog jumps into the pool", False),  # a headline-style animal
    ("Mike loses his balance", True),  # WordNet's mike is a microphone; bare, and "his" refers back
    ("Will tries to flip a pancake", True),  # never the modal before a finite verb
    ("A wakeboarder faceplants into the water", True),  # an unknown -s word after a person is the verb
    ("A welder's sparks set his sleeve on fire", False),  # "his" is the welder's; sparks are known
])
def test_evidence_beyond_wordnet(caption, person):
    _require_wordnet()
    assert is_person_subject(caption) is person


def test_extra_words_extend_the_lexicon():
    assert analyse_subject("the robot falls", extra_person=["robot"]).is_person
    assert not analyse_subject("the man falls", extra_non_person=["man"]).is_person
    assert not analyse_subject("the boxer runs", extra_non_person=["boxer"]).is_person
    assert analyse_subject("the boxer runs").is_person


def test_lexicon_file_lists_each_word_once_and_never_on_both_sides():
    lex = words.load_lexicon()
    for section, listed in lex.items():
        assert len(listed) == len(set(listed)), (section, sorted({w for w in listed if listed.count(w) > 1}))
    assert not set(lex["person"]) & set(lex["not_person"])


@pytest.mark.parametrize("caption, person", [
    ("Sarah falls off the paddle board", True),  # names are people, at the start or not
    ("John tries to jump across the creek", True),
    ("then Kevin slips on the ice", True),
    ("The TV falls off the wall", False),  # capitalised after a determiner: no name
    ("Dog jumps into the pool", False),  # a capitalised first word that is a common noun
    ("the fans run onto the field", True),  # the exact plural wins over "fan" (a machine)
    ("a fan falls off the ceiling", False),
    ("the paramedic trips over the stretcher", True),  # WordNet's person.n.01 hyponyms
    ("a lumberjack cuts down a tree", True),
    ("the commentator falls out of his chair", True),
    ("the tiger jumps at the glass", False),  # WordNet's first sense is a person; an animal sense vetoes
    ("two firemen fall off the truck", True),  # plural
    ("the hammock rips", False),
])
def test_names_wordnet_and_plurals(caption, person):
    _require_wordnet()
    assert is_person_subject(caption) is person, analyse_subject(caption)


def test_without_wordnet_the_lexicon_still_decides_and_a_warning_says_so(monkeypatch, caplog):
    wordnet._wordnet.cache_clear()
    wordnet.noun_senses.cache_clear()
    wordnet.fingerprint.cache_clear()

    def missing():
        raise LookupError("Resource wordnet not found.")

    monkeypatch.setattr(wordnet, "_load_reader", missing)
    try:
        with caplog.at_level("WARNING"):
            assert not wordnet.available() and wordnet.fingerprint() == "none"
        assert "WordNet is not available" in caplog.text
        assert is_person_subject("a man rides a bike") and not is_person_subject("the dog barks")
    finally:
        wordnet._wordnet.cache_clear()
        wordnet.noun_senses.cache_clear()
        wordnet.fingerprint.cache_clear()


@pytest.mark.parametrize("caption", ["'", "'s", "the", "and and or", "of of of", "the man's", "there is",
                                     "in the", "when", "the goal was", "\u00e9t\u00e9 \u2019s", "a " * 500,
                                     "!!! ,,, ???", "the the the man"])
def test_odd_captions_never_crash(caption):
    result = analyse_subject(caption)
    assert result.is_person in (True, False) and (result.problem is None) == result.is_person


# -- the prompts stage ----------------------------------------------------------------------------
def _annotation(goal: str, wentwrong: str, gsv=(), wsv=()) -> dict:
    return {"goal": goal, "wentwrong": wentwrong, "kgoalsvos": list(gsv), "kwentwrongsvos": list(wsv)}


SVOS = {
    "train": {
        "Clip A": [_annotation("a man rides a bike.", "he falls off the bike"),
                   _annotation("the dog runs", "the man trips")],
        "Dog clip": [_annotation("a dog chases a ball", "the dog knocks over a boy",
                                 [["dog", "chase", "ball"]], [["dog", "knock", "boy"]])],
        "Half clip": [_annotation("a girl jumps on a trampoline", "Don't know")],
        "Empty goal": [_annotation("", "the man slips")],
    },
    "val": {
        "Test clip": [_annotation("a woman dances", "she trips")],
        "Val clip": [_annotation("two kids   play", "the kids fall")],
    },
}


@pytest.fixture
def prompt_ctx(tmp_path):
    root = tmp_path / "oops"
    (root / "svos").mkdir(parents=True)
    for split, data in SVOS.items():
        (root / "svos" / f"{split}.json").write_text(json.dumps(data), encoding="utf-8")

    def make(**overrides) -> Context:
        cfg = load_config("smoke", {"oops.root": str(root), "fixtures.build_tiny_models": False,
                                    "fixtures.build_sample_oops": False, **overrides})
        ctx = Context.create(cfg, str(tmp_path / f"out-{len(os.listdir(tmp_path))}"))
        write_manifest(ctx.store, "pairs", [
            {"sample_key": f"{clip_key('Test clip')}-{b}", "clip_key": clip_key("Test clip"), "status": OK,
             "reason": None} for b in ("normal", "anomaly")
        ] + [{"sample_key": f"{clip_key('Val clip')}-normal", "clip_key": clip_key("Val clip"), "status": REJECTED,
              "reason": "pair too similar"}])
        return ctx

    return make


def _rows(ctx) -> dict[str, dict]:
    return {r["sample_key"]: r for r in read_manifest(ctx.store, "prompts")}


def test_prompts_stage_builds_kinds_links_and_reasons(prompt_ctx):
    ctx = prompt_ctx()
    run_stage(ctx, PROMPTS_STAGE)
    rows = _rows(ctx)
    assert len(rows) == 3 * 6  # one row per (clip, kind), ok or rejected
    a = clip_key("Clip A")
    assert rows[f"{a}-n"]["status"] == OK and rows[f"{a}-n"]["subject"] == "man"
    assert rows[f"{a}-n"]["prompt"] == "a man rides a bike." and rows[f"{a}-n"]["annotation_index"] == 0
    assert rows[f"{a}-a"]["subject"] == "he" and rows[f"{a}-a"]["split"] == "train"
    assert rows[f"{a}-ap"]["kind"] == "a+" and rows[f"{a}-ap"]["prompt"] == "a man rides a bike, he falls off the bike"
    assert json.loads(rows[f"{a}-n"]["counterpart_keys"]) == [f"{a}-a", f"{a}-ap"]
    assert json.loads(rows[f"{a}-a"]["counterpart_keys"]) == [f"{a}-n"]

    dog = clip_key("Dog clip")
    assert rows[f"{dog}-n"]["reason"] == "subject 'dog' is not a person"
    assert rows[f"{dog}-ap"]["reason"].startswith("a+ needs both C_n and C_a kept")

    half = clip_key("Half clip")
    assert rows[f"{half}-n"]["status"] == OK
    assert rows[f"{half}-a"]["reason"].startswith("no usable caption")
    assert "C_a: no usable caption" in rows[f"{half}-ap"]["reason"]
    assert json.loads(rows[f"{half}-n"]["counterpart_keys"]) == []  # only ok prompts are linked

    empty = clip_key("Empty goal")
    assert rows[f"{empty}-n"]["reason"] == "empty caption" and rows[f"{empty}-a"]["status"] == OK
    assert rows[f"{empty}-ap"]["status"] == REJECTED

    test = clip_key("Test clip")
    assert {rows[f"{test}-{k}"]["reason"] for k in ("n", "a", "ap")} == {"clip is a test-set candidate (kept by pairs)"}
    val = clip_key("Val clip")  # its only pairs row was rejected: not a test candidate
    assert rows[f"{val}-n"]["prompt"] == "two kids play" and rows[f"{val}-ap"]["status"] == OK


def test_missing_pairs_manifest_is_a_clear_error(prompt_ctx):
    ctx = prompt_ctx()
    ctx.store.remove("manifests/pairs.parquet")
    with pytest.raises(FileNotFoundError, match="exclude_test_clips"):
        PROMPTS_STAGE.plan_units(ctx)
    ctx = prompt_ctx(**{"prompts.exclude_test_clips": False})
    ctx.store.remove("manifests/pairs.parquet")
    run_stage(ctx, PROMPTS_STAGE)
    assert _rows(ctx)[f"{clip_key('Test clip')}-n"]["status"] == OK


def test_every_annotation_gets_indexed_keys_and_out_of_range_is_a_reason(prompt_ctx):
    ctx = prompt_ctx(**{"prompts.annotation_index": "all"})
    run_stage(ctx, PROMPTS_STAGE)
    rows, a = _rows(ctx), clip_key("Clip A")
    assert len(rows) == 3 * 7
    assert rows[f"{a}-1-n"]["reason"] == "subject 'dog' is not a person" and rows[f"{a}-1-a"]["status"] == OK
    assert rows[f"{a}-1-a"]["annotation_index"] == 1
    assert json.loads(rows[f"{a}-0-n"]["counterpart_keys"]) == [f"{a}-0-a", f"{a}-0-ap", f"{a}-1-a"]

    ctx = prompt_ctx(**{"prompts.annotation_index": 1})
    run_stage(ctx, PROMPTS_STAGE)
    rows = _rows(ctx)
    assert rows[f"{a}-a"]["prompt"] == "the man trips"
    assert rows[f"{clip_key('Dog clip')}-n"]["reason"] == ("clip has 1 caption annotation(s); "
                                                           "annotation_index=1 is out of range")


def test_extra_person_words_from_the_config(prompt_ctx):
    ctx = prompt_ctx(**{"prompts.extra_person_words": ["dog"], "prompts.extra_non_person_words": ["man"]})
    run_stage(ctx, PROMPTS_STAGE)
    rows = _rows(ctx)
    assert rows[f"{clip_key('Dog clip')}-ap"]["status"] == OK
    assert rows[f"{clip_key('Clip A')}-n"]["reason"] == "subject 'man' is not a person"


def test_prompt_keys_follow_the_convention():
    assert prompts_stage.prompt_key("c0123456789", "a+") == "c0123456789-ap"
    assert prompts_stage.prompt_key("c0123456789", "n", 1) == "c0123456789-1-n"


def test_the_prompts_stage_hash_follows_its_lexicon_file_and_wordnet(tmp_path):
    import dataclasses

    from pab_build.engine.pipeline import STAGE_ORDER, get_stage

    assert words.LEXICON_PATH in PROMPTS_STAGE.data_files and wordnet.fingerprint in PROMPTS_STAGE.data_files
    cfg = load_config("smoke")
    copy = tmp_path / "subject_lexicon.txt"
    copy.write_bytes(words.LEXICON_PATH.read_bytes())
    stage = dataclasses.replace(PROMPTS_STAGE, data_files=(copy, wordnet.fingerprint))
    before = stage.stage_hash(cfg)
    assert before == PROMPTS_STAGE.stage_hash(cfg)  # the same content, the same hash
    copy.write_text(copy.read_text() + "\n[person]\nrobot\n")
    assert stage.stage_hash(cfg) != before
    # no other stage reads the lexicon: editing it redoes them only through changed prompt rows
    readers = [name for name in STAGE_ORDER if words.LEXICON_PATH in get_stage(name).data_files]
    assert readers == ["prompts"]

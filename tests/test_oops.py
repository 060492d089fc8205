import json

from pab_build import oops


def _clip(times, length=10.0, rel=None):
    return oops.ClipRecord("c", "k", "val", "/v.mp4", tuple(times), length, rel, ())


RULE = dict(min_rel_t=0.01, max_rel_t=0.99, min_len_s=3.2, max_len_s=30.0)


def test_failure_time_is_the_median_of_annotators():
    assert _clip([2.0, 9.0, 3.0]).failure_time_s == 3.0
    assert _clip([-1.0, -1.0, 4.0]).failure_time_s == -1.0


def test_filter_rule_follows_the_official_loader():
    assert oops.filter_reason(_clip([3, 3, 3], rel=(0.3,) * 3), 10.0, **RULE) is None
    assert "no failure time" in oops.filter_reason(_clip([-1, -1, 5]), 10.0, **RULE)
    assert "length 2.00s" in oops.filter_reason(_clip([1, 1, 1]), 2.0, **RULE)
    assert "length 31.00s" in oops.filter_reason(_clip([1, 1, 1]), 31.0, **RULE)
    assert "relative failure time 0.995" in oops.filter_reason(_clip([9.95] * 3, rel=(0.995,) * 3), 10.0, **RULE)
    # held-out clips have no rel_t: it is derived from the video's own duration
    assert "relative failure time 0.005" in oops.filter_reason(_clip([0.05] * 3, length=None), 10.0, **RULE)
    assert oops.filter_reason(_clip([5] * 3, length=None), 10.0, **RULE) is None


def test_mojibake_is_repaired_and_clean_names_are_left_alone():
    name = "Café fail – waiter trips"
    broken = name.encode("utf-8").decode("cp1252")
    assert broken != name
    assert oops.repair_mojibake(broken) == name
    assert oops.repair_mojibake(name) == name
    assert oops.repair_mojibake("plain (May 2017)12") == "plain (May 2017)12"
    assert oops.clip_key(broken) == oops.clip_key(name)


def test_load_clips_reads_real_schemas(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "svos").mkdir()
    (tmp_path / "oops_video" / "val").mkdir(parents=True)
    name = "Café fail"
    (tmp_path / "oops_video" / "val" / f"{name}.mp4").write_bytes(b"x")
    broken = name.encode("utf-8").decode("cp1252")
    (tmp_path / "annotations" / "transition_times.json").write_text(json.dumps(
        {broken: {"t": [1.0, 2.0, 3.0], "len": 6.0, "rel_t": [0.1, 0.3, 0.5], "n_notfound": 0}}))
    (tmp_path / "svos" / "val.json").write_text(json.dumps(
        {broken: [{"goal": "a man walks", "wentwrong": "he falls", "kgoalsvos": [["man", "walks", ""]],
                   "kwentwrongsvos": []}], "no video": [{"goal": "x", "wentwrong": "y"}]}))
    clips = {c.clip_name: c for c in oops.load_clips(str(tmp_path), ["val"])}
    assert set(clips) == {name, "no video"}
    c = clips[name]
    assert c.failure_time_s == 2.0 and c.length_s == 6.0 and c.median_rel_t == 0.3
    assert c.captions[0].goal == "a man walks" and c.captions[0].goal_svos == [["man", "walks", ""]]
    assert clips["no video"].video_path is None


def test_an_annotation_file_that_is_a_pipe_is_named_not_opened(tmp_path):
    import os

    (tmp_path / "annotations").mkdir()
    os.mkfifo(tmp_path / "annotations" / "transition_times.json")
    f = oops.load_annotation_file(str(tmp_path), "annotations/transition_times.json")
    assert f.records == {} and f.error == "annotations/transition_times.json is unreadable: not a regular file"

"""Store atomicity and unit markers, including a process SIGKILLed in the middle of a write."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pab_build.config import load_config
from pab_build.manifests import read_manifest, reject
from pab_build.store import Store
from pab_build.engine.units import Context, Stage, Unit, chunk_units, execute_unit, run_stage


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.write_bytes("a/x.bin", b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.write_bytes("a/x.bin", b"new")
    assert store.read_bytes("a/x.bin") == b"old"
    assert sorted(os.listdir(tmp_path / "a")) == ["x.bin"]  # the temporary file is gone too


def test_store_refuses_paths_that_escape_the_root(tmp_path):
    with pytest.raises(ValueError):
        Store(str(tmp_path)).write_bytes("../evil", b"x")


def _toy_stage(calls: list, fail_on: str | None = None) -> Stage:
    def plan(ctx):
        items = [{"sample_key": f"k{i}", "v": i} for i in range(5)]
        return chunk_units("frames", items, 2)

    def run(ctx, unit):
        calls.append(unit.unit_id)
        rows = []
        for it in unit.items:
            if it["sample_key"] == fail_on:
                raise RuntimeError("poisoned input")
            if it["v"] == 3:
                rows.append(reject(it, "odd one out"))
            else:
                ctx.store.write_bytes(f"toy/{it['sample_key']}.txt", str(it["v"]).encode())
                rows.append({"sample_key": it["sample_key"], "status": "ok", "reason": None})
        return rows

    return Stage("frames", plan, run, config_keys=("frames",))


def test_rerun_skips_done_units_and_config_change_invalidates(tmp_path):
    cfg = load_config("smoke")
    ctx = Context.create(cfg, str(tmp_path))
    calls: list = []
    stage = _toy_stage(calls)
    assert run_stage(ctx, stage) == {"done": 3, "skipped": 0, "failed": 0}
    rows = read_manifest(ctx.store, "frames")
    assert [r["sample_key"] for r in rows] == ["k0", "k1", "k2", "k3", "k4"]
    assert rows[3]["status"] == "rejected" and rows[3]["reason"] == "odd one out"
    assert run_stage(ctx, stage)["skipped"] == 3
    ctx2 = Context.create(load_config("smoke", ["frames.jpeg_quality=50"]), str(tmp_path))
    assert run_stage(ctx2, stage)["done"] == 3  # this stage's config changed: redone
    ctx3 = Context.create(load_config("smoke", ["frames.jpeg_quality=50", "generate.steps=9"]), str(tmp_path))
    assert run_stage(ctx3, _toy_stage([]))["skipped"] == 3  # another stage's config: not redone


def test_unit_failing_after_retries_becomes_rejected_rows(tmp_path):
    ctx = Context.create(load_config("smoke"), str(tmp_path))
    calls: list = []
    counts = run_stage(ctx, _toy_stage(calls, fail_on="k2"), retries=2)
    assert counts == {"done": 2, "skipped": 0, "failed": 1}
    assert calls.count("000001") == 3  # first try + 2 retries
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames")}
    assert len(rows) == 5
    assert rows["k2"]["status"] == rows["k3"]["status"] == "rejected"
    assert "poisoned input" in rows["k2"]["reason"] and "failed after retries" in rows["k2"]["reason"]
    # a later run retries the failed unit (and only it)
    calls.clear()
    assert run_stage(ctx, _toy_stage(calls), retries=0) == {"done": 1, "skipped": 2, "failed": 0}
    assert calls == ["000001"]


def test_rows_must_match_items_one_to_one(tmp_path):
    ctx = Context.create(load_config("smoke"), str(tmp_path))
    stage = Stage("frames", lambda c: [], lambda c, u: [], config_keys=())
    unit = Unit("frames", "000000", ({"sample_key": "a"},))
    with pytest.raises(RuntimeError, match="one to one"):
        execute_unit(ctx, stage, unit)
    assert ctx.store.read_marker("frames", "000000") is None


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pab_build.store import Store
    from pab_build.config import load_config
    from pab_build.engine.units import Context, run_stage
    sys.path.insert(0, {tests!r})
    from test_units import _toy_stage
    real_write = Store.write_bytes
    n = {{"writes": 0}}
    def dying_write(self, rel, data):
        n["writes"] += 1
        if n["writes"] == {kill_at}:
            # die in the middle of writing: half the bytes are in the temporary file
            folder, name = os.path.split(self.path(rel))
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "." + name + ".tmp-x"), "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, rel, data)
    Store.write_bytes = dying_write
    run_stage(Context.create(load_config("smoke"), {out!r}), _toy_stage([]))
    """
)


@pytest.mark.parametrize("kill_at", [2, 3, 4, 7])
def test_sigkill_mid_unit_leaves_nothing_visible_and_rerun_completes(tmp_path, kill_at):
    out = str(tmp_path / "out")
    script = KILLER.format(tests=os.path.dirname(__file__), kill_at=kill_at, out=out)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = Store(out)
    visible = [f for f in store.listdir("toy") if not f.startswith(".")]
    done_units = [m for m in store.listdir("_markers/frames")]
    # every visible output file is complete; a unit without a marker will be redone
    for f in visible:
        assert store.read_text(f"toy/{f}") == f[1:-4]
    assert not store.exists("manifests/frames.parquet")
    calls: list = []
    counts = run_stage(Context.create(load_config("smoke"), out), _toy_stage(calls))
    assert counts["skipped"] == len(done_units) and counts["done"] == 3 - len(done_units)
    ref = str(tmp_path / "ref")
    run_stage(Context.create(load_config("smoke"), ref), _toy_stage([]))
    assert Store(out).read_bytes("manifests/frames.parquet") == Store(ref).read_bytes("manifests/frames.parquet")


def test_renamed_stage_outputs_are_migrated(tmp_path):
    """A build made when ``train_attributes`` was called ``attributes`` keeps its finished units."""
    from pab_build.manifests import manifest_rel
    from pab_build.engine.prepare import migrate_renamed_stages

    store = Store(str(tmp_path))
    store.write_json("_markers/attributes/000000.json", {"status": "done"})
    store.write_bytes("_units/attributes/000000.parquet", b"rows")
    store.write_bytes(manifest_rel("attributes"), b"manifest")
    moved = migrate_renamed_stages(store)
    assert len(moved) == 3
    assert store.read_json("_markers/train_attributes/000000.json") == {"status": "done"}
    assert store.read_bytes("_units/train_attributes/000000.parquet") == b"rows"
    assert store.read_bytes(manifest_rel("train_attributes")) == b"manifest"
    assert not store.exists("_markers/attributes") and not store.exists(manifest_rel("attributes"))
    assert migrate_renamed_stages(store) == []  # idempotent


def _data_stages(data, calls):
    """frames reads a data file (which keys to reject); pose plans from frames' ok rows; pairs
    depends on neither: the cascade a data-file edit must follow."""
    def plan_frames(ctx):
        return chunk_units("frames", [{"sample_key": f"k{i}"} for i in range(4)], 2)

    def run_frames(ctx, unit):
        calls.append(("frames", unit.unit_id))
        bad = data.read_text().split()
        return [reject(it, "listed in the data file") if it["sample_key"] in bad else
                {"sample_key": it["sample_key"], "status": "ok", "reason": None} for it in unit.items]

    def plan_pose(ctx):
        keys = [r["sample_key"] for r in read_manifest(ctx.store, "frames") if r["status"] == "ok"]
        return chunk_units("pose", [{"sample_key": k} for k in keys], 1)

    def plan_pairs(ctx):
        return chunk_units("pairs", [{"sample_key": "p0"}], 1)

    def run_other(ctx, unit):
        calls.append((unit.stage, unit.unit_id))
        return [{"sample_key": it["sample_key"], "status": "ok", "reason": None} for it in unit.items]

    return [Stage("frames", plan_frames, run_frames, config_keys=("frames",), data_files=(data,)),
            Stage("pose", plan_pose, run_other, config_keys=("pose",)),
            Stage("pairs", plan_pairs, run_other, config_keys=("pairs",))]


def test_editing_a_data_file_redoes_its_stage_and_only_the_outputs_it_changed(tmp_path):
    data = tmp_path / "lexicon.txt"
    data.write_text("k9\n")
    calls: list = []
    stages = _data_stages(data, calls)
    ctx = Context.create(load_config("smoke"), str(tmp_path / "out"))
    for st in stages:
        run_stage(ctx, st)
    assert len(calls) == 2 + 4 + 1
    calls.clear()
    for st in stages:
        run_stage(ctx, st)
    assert calls == []  # nothing changed: all skipped

    data.write_text("k9\n# a comment, same decisions\n")
    for st in stages:
        run_stage(ctx, st)
    assert calls == [("frames", "000000"), ("frames", "000001")]  # outputs equal: pose's inputs too

    calls.clear()
    data.write_text("k2\n")  # k2 is now rejected: pose loses one item, its later units shift
    for st in stages:
        run_stage(ctx, st)
    assert ("frames", "000000") in calls and not [c for c in calls if c[0] == "pairs"]
    assert ("pose", "000000") not in calls and ("pose", "000001") not in calls  # k0, k1: unchanged
    assert ("pose", "000002") in calls  # was k2, is now k3

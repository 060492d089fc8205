"""ResNet-50 pair filter (stage pairs) with the tiny random ResNet-50, and the cosine rule."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pab_build.models import similarity
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.models.loading import LOAD_COUNTS, release_models
from pab_build.stages import pairs as pairs_stage
from pab_build.engine.units import Context, execute_unit, run_stage


def _picture(seed: int, size=(80, 64)) -> Image.Image:
    """A background colour with a bright block and a dark stripe, placed by the seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    arr[y : y + h // 2, x : x + w // 3] = rng.integers(0, 255, 3)
    arr[:, int(rng.integers(0, w - 8)) :][:, :6] = 0
    return Image.fromarray(arr)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -- the cosine rule on fixed vectors -------------------------------------------------------------
def test_pair_cosines_on_fixed_vectors():
    normal = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0], [1.0, 0.0]])
    anomaly = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    assert similarity.pair_cosines(normal, anomaly) == pytest.approx([1.0, 2 ** -0.5, 0.0, -1.0])
    torch.manual_seed(0)
    same = torch.nn.functional.normalize(torch.randn(64, 2048), dim=1)
    cosines = similarity.pair_cosines(same, same.clone())  # float error alone would give up to 1 + 4e-7
    assert max(cosines) == 1.0 and min(cosines) > 0.9999
    assert all(similarity.similarity_problem(c, 1.0) is None for c in cosines)  # max_cosine=1.0 keeps all
    with pytest.raises(ValueError, match="feature shapes differ"):
        similarity.pair_cosines(normal, anomaly[:2])


def test_similarity_problem_rejects_only_above_the_threshold():
    assert similarity.similarity_problem(0.95, 0.95) is None  # paper: "greater than 0.95"
    assert similarity.similarity_problem(0.2, 0.95) is None
    why = similarity.similarity_problem(0.9612347, 0.95)
    assert why == "pair too similar: ResNet-50 cosine 0.961235 above max_cosine=0.95"


# -- the tiny model and embeddings ----------------------------------------------------------------
def test_load_resnet50_from_a_folder_is_cached_and_has_no_classifier(tiny_model, tmp_path):
    folder = tiny_model("resnet50")
    release_models()  # an earlier test may have loaded it (and a stage end released it)
    before = LOAD_COUNTS.get(("resnet50", folder, "cpu"), 0)
    model = similarity.load_resnet50(folder, "cpu")
    assert similarity.load_resnet50(folder, "cpu") is model
    assert LOAD_COUNTS[("resnet50", folder, "cpu")] == before + 1
    assert isinstance(model.fc, torch.nn.Identity) and not model.training
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        similarity.load_resnet50(str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="unknown torchvision ResNet-50 weights 'IMAGENET1K_V9'"):
        similarity.load_resnet50("torchvision:IMAGENET1K_V9", "cpu")  # fails before any download


def test_embeddings_are_unit_vectors_and_batch_independent(tiny_model):
    model = similarity.load_resnet50(tiny_model("resnet50"), "cpu")
    images = [_picture(0), _picture(1), _picture(0)]
    feats = similarity.embed_images(images, model, image_size=64, batch_size=2, device="cpu")
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    one_by_one = similarity.embed_images(images, model, image_size=64, batch_size=1, device="cpu")
    assert torch.allclose(feats, one_by_one, atol=1e-5)
    same, different = similarity.pair_cosines(feats[[0, 0]], feats[[2, 1]])
    assert same == pytest.approx(1.0, abs=1e-6) and different < 0.9999
    assert similarity.embed_images([], model, 64, 2, "cpu").shape[0] == 0


# -- stage ----------------------------------------------------------------------------------------
def _pose_manifest(ctx: Context) -> None:
    """Clip a: two different frames. Clip b: the same picture twice. Clip c: pose kept only one
    frame. Clip d: the anomaly file is gone."""
    pictures = {"ca-normal": _picture(1), "ca-anomaly": _picture(2), "cb-normal": _picture(3),
                "cb-anomaly": _picture(3), "cc-normal": _picture(4), "cd-normal": _picture(5)}
    rows = []
    for key in ["ca-normal", "ca-anomaly", "cb-normal", "cb-anomaly", "cc-normal", "cd-normal", "cd-anomaly"]:
        rel = f"frames/{key}.jpg"
        sha = None
        if key in pictures:
            data = _jpeg(pictures[key])
            ctx.store.write_bytes(rel, data)
            sha = hashlib.sha256(data).hexdigest()
        clip, behavior = key.split("-")
        rows.append({"sample_key": key, "status": OK, "reason": None, "clip_key": clip, "behavior": behavior,
                     "image_path": rel, "image_sha256": sha, "pose_path": f"pose/{key}.png"})
    rows.append({"sample_key": "cc-anomaly", "status": REJECTED, "reason": "no person detected",
                 "clip_key": "cc", "behavior": "anomaly"})
    write_manifest(ctx.store, "pose", rows)


def test_pairs_stage_rejects_identical_pairs_and_reruns_nothing(ctx, tiny_model):
    tiny_model("resnet50")
    ctx.cfg.pairs.max_cosine = 0.9999  # the tiny random ResNet-50 puts different frames at ~0.99
    ctx.cfg.pairs.clips_per_unit = 2
    _pose_manifest(ctx)
    counts = run_stage(ctx, pairs_stage.STAGE)
    assert counts == {"done": 2, "skipped": 0, "failed": 0}
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "pairs")}
    assert sorted(rows) == ["ca-anomaly", "ca-normal", "cb-anomaly", "cb-normal", "cc-normal", "cd-anomaly",
                            "cd-normal"]
    a_n, a_a = rows["ca-normal"], rows["ca-anomaly"]
    assert a_n["status"] == a_a["status"] == OK
    assert (a_n["pair_key"], a_a["pair_key"]) == ("ca-anomaly", "ca-normal")
    assert a_n["cosine"] == a_a["cosine"] < 0.9999
    b_n, b_a = rows["cb-normal"], rows["cb-anomaly"]
    assert b_n["status"] == b_a["status"] == REJECTED and b_n["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert b_n["reason"] == "pair too similar: ResNet-50 cosine 1.000000 above max_cosine=0.9999"
    assert b_a["pair_key"] == "cb-normal"
    assert rows["cc-normal"]["reason"] == "no counterpart: pose kept only ['normal'] of clip cc"
    assert rows["cd-anomaly"]["reason"].startswith("image unreadable: frames/cd-anomaly.jpg")
    assert rows["cd-normal"]["reason"].startswith("counterpart cd-anomaly image unreadable")
    assert rows["cd-normal"]["cosine"] is None and rows["cd-normal"]["pair_key"] == "cd-anomaly"

    units = pairs_stage.STAGE.plan_units(ctx)
    assert [execute_unit(ctx, pairs_stage.STAGE, u) for u in units] == ["skipped", "skipped"]

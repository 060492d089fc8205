"""``pab cmp-eval``: any checkpoint on a build's test shards, refusing random evaluation weights;
the official 4-process score combination."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main
from pab_build.cmp.evaluate import SIM_WEIGHT, combine_scores
from pab_build.fixtures.tiny_cmp import official_cmp_state, write_synthetic_cmp_shards


@pytest.fixture(scope="module")
def build_out(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cmp-eval-build"))
    write_synthetic_cmp_shards(root, "test", n_identities=6, image_size=32)
    return root


def cli_sets(models_dir: str, **extra) -> list[str]:
    sets = {"fixtures.models_dir": models_dir, "cmp.image_size": 32, "cmp.embed_dim": 16, "cmp.pose_heads": 4,
            "cmp.pose_stem_width": 8, "cmp.rerank_k": 4, **{f"cmp.{k}": v for k, v in extra.items()}}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


def test_cmp_eval_scores_an_official_checkpoint(tiny_model, models_dir, build_out, tmp_path, capsys):
    tiny_model("swin"), tiny_model("bert")
    pth = tmp_path / "cmp.pth"
    torch.save({"model": official_cmp_state(), "config": {}}, pth)
    out = tmp_path / "eval"
    code = run_cli(["cmp-eval", "--checkpoint", str(pth), "--build", build_out, "--out", str(out),
                    "--profile", "smoke", *cli_sets(models_dir)])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "cmp" / "eval.json").read_text())
    assert (written["num_queries"], written["num_gallery"], written["checkpoint_step"]) == (12, 12, None)
    for setting in ("behavior", "identity"):
        assert set(written[setting]) == {"r1", "r5", "r10", "mAP", "mINP"}
    assert json.loads(capsys.readouterr().out)["num_queries"] == 12

    # the paper heads cannot hold the official projections: refused, one clear line, exit 2
    code = run_cli(["cmp-eval", "--checkpoint", str(pth), "--build", build_out, "--out", str(tmp_path / "p"),
                    "--profile", "smoke", *cli_sets(models_dir, itc_head="paper")])
    err = capsys.readouterr().err
    assert code == 2 and "pab: error:" in err and "image_proj.weight" in err and "--allow-partial" in err
    assert not (tmp_path / "p").exists()
    code = run_cli(["cmp-eval", "--checkpoint", str(pth), "--build", build_out, "--out", str(tmp_path / "p"),
                    "--profile", "smoke", "--allow-partial", *cli_sets(models_dir, itc_head="paper")])
    assert code == 0 and (tmp_path / "p" / "cmp" / "eval.json").exists()

    code = run_cli(["cmp-eval", "--checkpoint", str(tmp_path / "nothing.pth"), "--build", build_out])
    assert code == 2 and "no such checkpoint" in capsys.readouterr().err


def test_single_combination_is_the_official_one_process_scoring():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(6, 6, generator=g)
    top_idx = sims.topk(3, dim=1).indices
    itm_topk = torch.randn(6, 3, generator=g)
    itm = itm_topk.min(1, keepdim=True).values.expand(-1, 6).clone()  # unscored: the row's minimum
    itm.scatter_(1, top_idx, itm_topk)
    want = (itm - itm.min()) / (itm.max() - itm.min()) + SIM_WEIGHT * (sims - sims.min()) / (sims.max() - sims.min())
    torch.testing.assert_close(combine_scores(sims, itm_topk, top_idx, "single"), want)


def test_official_4gpu_combination_compresses_itm_and_counts_similarity_four_times():
    """eval.py on 4 processes: rank r scores rows [5r, 5r + 5) of 16, other rows stay 1000; after its
    min-max a row of another rank is all 1; the all_reduce sums the 4 matrices."""
    g = torch.Generator().manual_seed(1)
    Q, k = 16, 4
    sims = torch.rand(Q, Q, generator=g)
    top_idx = sims.topk(k, dim=1).indices
    itm_topk = torch.randn(Q, k, generator=g) * 3
    itm = itm_topk.min(1, keepdim=True).values.expand(-1, Q).clone()
    itm.scatter_(1, top_idx, itm_topk)
    sim_n = (sims - sims.min()) / (sims.max() - sims.min())
    got = combine_scores(sims, itm_topk, top_idx, "official_4gpu")
    for rank, rows in enumerate([range(0, 5), range(5, 10), range(10, 15), range(15, 16)]):
        low = itm[list(rows)].min()
        for i in rows:
            want = (itm[i] - low) / (1000.0 - low) + 3.0 + 4 * SIM_WEIGHT * sim_n[i]
            torch.testing.assert_close(got[i], want)
    # the ranking differs from the one-process scoring: similarity now outweighs ITM differences
    single = combine_scores(sims, itm_topk, top_idx, "single")
    assert not torch.equal(got.argsort(1, descending=True)[:, 0], single.argsort(1, descending=True)[:, 0])

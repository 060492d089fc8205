"""OpenPose body post-processing, images/s: controlnet-aux's (``Body.__call__``, NumPy/OpenCV/SciPy, image
by image) vs pab_build/models/pose_postprocess.py (torch, batched, on the network's device), in one run.

    python bench/bench_pose_postprocess.py [--images 8] [--sizes 512,1024] [--batch-size 16] [--device cpu]

Both read the same network outputs: synthetic PAFs and heatmaps of a few people
(pab_build/fixtures/synthetic_openpose.py), computed once per size and returned by a stand-in network,
so only the post-processing (and controlnet-aux's input resize, which both do) is timed, and it has
people to assemble. Images are ``size`` x ``size`` (the detect resolution). ``torch`` is timed warm:
its resize matrices are built once per image shape per process (``warm_up_s``). The last line is
``speedup=X``: torch at the stage's batch size over controlnet-aux, the lower of the sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.fixtures import synthetic_openpose as so  # noqa: E402
from pab_build.models import pose_postprocess as pp  # noqa: E402
from pab_build.models.openpose import import_open_pose  # noqa: E402

PEOPLE = [so.front(0.6, (0.25, 0.95)), so.profile(0.7, (0.5, 0.9)), so.lying(0.35, (0.55, 0.55)),
          so.front(0.4, (0.8, 0.8))]


class FixedOutputs(torch.nn.Module):
    """The body network's place: the same (PAFs, heatmaps) for every image of a batch."""

    def __init__(self, paf: np.ndarray, heat: np.ndarray, device: str):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=device), requires_grad=False)
        self.paf, self.heat = torch.from_numpy(paf).to(device), torch.from_numpy(heat).to(device)

    def forward(self, x):
        return self.paf.expand(len(x), -1, -1, -1), self.heat.expand(len(x), -1, -1, -1)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8, help="timed images per phase and size")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--batch-size", type=int, default=16, help="configs/full.yaml gen_pose.batch_size")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import_open_pose()
    from controlnet_aux.open_pose import Body

    body = Body.__new__(Body)  # controlnet-aux's Body with its network's place taken (no weights read)
    rng = np.random.default_rng(0)
    speedups = []
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {len(PEOPLE)} people per image")
    for size in (int(s) for s in args.sizes.split(",")):
        bgr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        data, resized_hw = pp.network_input(bgr)
        paf, heat = so.network_outputs([[None if p is None else (p[0] * resized_hw[1], p[1] * resized_hw[0])
                                         for p in person] for person in PEOPLE], data.shape[2:])
        body.model = FixedOutputs(paf, heat, args.device)
        images = [bgr] * args.images

        start = time.perf_counter()
        pp.body_poses(body, images[:1])
        sync(args.device)
        warm_up = time.perf_counter() - start
        rates = {}
        start = time.perf_counter()
        aux = [body(im) for im in images]
        rates["controlnet_aux"] = args.images / (time.perf_counter() - start)
        for name, batch in (("torch_batch1", 1), (f"torch_batch{args.batch_size}", args.batch_size)):
            start = time.perf_counter()
            ours = [found for i in range(0, len(images), batch) for found in pp.body_poses(body, images[i : i + batch])]
            sync(args.device)
            rates[name] = args.images / (time.perf_counter() - start)
        same = all(np.array_equal(a[0][:, [0, 1, 3]], o[0][:, [0, 1, 3]]) and np.array_equal(a[1][:, :18], o[1][:, :18])
                   for a, o in zip(aux, ours))
        people = len(aux[0][1])
        base = rates["controlnet_aux"]
        print(f"{size} px: " + ", ".join(f"{k} {v:.2f} images/s ({v / base:.1f}x)" for k, v in rates.items())
              + f"; people {people}, same keypoints {same}; torch warm_up_s {warm_up:.2f}")
        speedups.append(rates[f"torch_batch{args.batch_size}"] / base)
    print(f"speedup={min(speedups):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

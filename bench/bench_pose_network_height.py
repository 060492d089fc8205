"""OpenPose network input height (``pose.network_height`` / ``gen_pose.network_height``): what 368 rows
cost against controlnet-aux's own 184, measured in this process on the same images.

    python bench/bench_pose_network_height.py [--images 3] [--heights 184,368] [--device cpu]

controlnet-aux always scales the image to 184 rows for the body network, whatever ``detect_resolution``
says; a person 10% of a frame's height is then ~18 px tall for the network. The body network is
controlnet-aux's ``bodypose_model`` (the real architecture, random weights: the time does not depend on
the weights). Images are random 16:9 frames at ``--detect-resolution``. Prints, per height, the network's
forward time alone and the whole ``detect_poses`` call (network + controlnet-aux's post-processing), the
fastest of ``--images`` calls each (on a shared machine the minimum is the least disturbed), and their
ratios to the first height.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.models import openpose  # noqa: E402


class _Timed(torch.nn.Module):
    """The body network, timing each forward (the input ``Body`` hands it)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seconds, self.shapes = net, [], []

    def forward(self, x):
        start = time.perf_counter()
        out = self.net(x)
        self.seconds.append(time.perf_counter() - start)
        self.shapes.append(tuple(x.shape[2:]))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--heights", default="184,368")
    ap.add_argument("--detect-resolution", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    openpose.import_open_pose()
    from controlnet_aux.open_pose import Body, OpenposeDetector
    from controlnet_aux.open_pose.model import bodypose_model

    body = Body.__new__(Body)  # Body.__init__ only loads a checkpoint; random weights time the same
    body.model = _Timed(bodypose_model().eval()).to(args.device)
    detector = OpenposeDetector(body)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)) for _ in range(args.images)]
    openpose.detect_poses(images[:1], detector, args.detect_resolution, 64)  # warm-up
    base = None
    print(f"device {args.device}, {args.images} images 1280x720, detect_resolution {args.detect_resolution}, "
          f"torch threads {torch.get_num_threads()}")
    for height in (int(h) for h in args.heights.split(",")):
        body.model.seconds.clear()
        detect = []
        for image in images:
            start = time.perf_counter()
            openpose.detect_poses([image], detector, args.detect_resolution, 64, network_height=height)
            detect.append(time.perf_counter() - start)
        network, whole = min(body.model.seconds), min(detect)
        base = base or (network, whole)
        print(f"network_height {height}: input {body.model.shapes[-1]}, network {network:.3f} s/image "
              f"({network / base[0]:.2f}x), detect_poses {whole:.3f} s/image ({whole / base[1]:.2f}x)")


if __name__ == "__main__":
    main()

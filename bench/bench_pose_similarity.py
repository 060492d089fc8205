"""Pose (OpenPose body network) and similarity (ResNet-50) throughput per batch size, against
batch size 1 in the same run. Weights are random (speed does not depend on their values); the
architectures are the real ones.

    python bench/bench_pose_similarity.py [--images 16] [--size 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.fixtures import build_tiny_models  # noqa: E402
from pab_build.models.openpose import (
    detect_poses,
    load_pose_detector,  # noqa: E402
)
from pab_build.models.similarity import (
    embed_images,
    load_resnet50,  # noqa: E402
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="1,4,16")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as d:
        paths = build_tiny_models(d, only=["openpose", "resnet50"])
        detector = load_pose_detector(paths["openpose"], args.device)
        resnet = load_resnet50(paths["resnet50"], args.device)
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        embed_images(images[:2], resnet, 224, 2, args.device)  # warm-up
        base = None
        for bs in batch_sizes:
            t0 = time.perf_counter()
            embed_images(images, resnet, 224, bs, args.device)
            rate = args.images / (time.perf_counter() - t0)
            base = base or rate
            print(f"resnet50 similarity  batch {bs:3d}: {rate:7.1f} images/s  ({rate / base:.2f}x batch 1)")
        base = None
        for bs in batch_sizes:
            t0 = time.perf_counter()
            for i in range(0, args.images, bs):
                detect_poses(images[i : i + bs], detector, args.size, args.size)
            rate = args.images / (time.perf_counter() - t0)
            base = base or rate
            print(f"openpose pose        batch {bs:3d}: {rate:7.1f} images/s  ({rate / base:.2f}x batch 1)")


if __name__ == "__main__":
    main()

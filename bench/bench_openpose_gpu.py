"""OpenPose (controlnet-aux's body network) images/s: the pose stages' per-image call vs. batching (GPU).

    python bench/bench_openpose_gpu.py [--images 32] [--batch-size 16] [--json out.json]
    python bench/bench_openpose_gpu.py --dry-run    # CPU: build on the meta device, print parameter counts

gen_pose runs on every generated image (1.53M in the paper), so it may cost as much as generation.
The body network is controlnet-aux's ``bodypose_model`` with random weights, written in the
``lllyasviel/Annotators`` layout by :mod:`pab_build.fixtures.tiny_openpose` (the real architecture
at full size) and loaded by the pose stages' loader. Images are random 1024x1024 RGB, resized to
``gen_pose.detect_resolution`` as the stage does. Phases:

* ``detect_per_image``: the stages' call (``detect_poses``: controlnet-aux's network, one image per
  forward, then its CPU post-processing: heatmap resizing, Gaussian filtering, part association);
* ``network_per_image``: the network's forward alone, one image per call (controlnet-aux's input);
* ``network_batched``: the same inputs stacked into batches of ``gen_pose.batch_size``.

The network phases show what batching on the GPU could save; ``detect_per_image`` minus
``network_per_image`` is the CPU post-processing the stage does per image. Random weights find no
people, so the part-association step (per person found) costs less here than on real images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from gpu_common import Results, add_common_args, device_name, device_or_exit, rate, round_up, timed

# the project's code this benchmark measures (imports kept here, in one place)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.model_lock import locked_config  # noqa: E402
from pab_build.fixtures.tiny_openpose import build_tiny_openpose  # noqa: E402
from pab_build.models.openpose import detect_poses, load_pose_detector  # noqa: E402


def network_input(image: Image.Image, detect_resolution: int) -> np.ndarray:
    """What controlnet-aux's ``Body.__call__`` feeds its network for one image (one scale, 0.5):
    BGR, resized so the height is 184 px, padded to a multiple of 8, scaled to [-0.5, 0.5)."""
    from controlnet_aux.open_pose import util
    from controlnet_aux.util import HWC3, resize_image

    bgr = resize_image(HWC3(np.asarray(image.convert("RGB"), dtype=np.uint8)), detect_resolution)[:, :, ::-1]
    scale = 0.5 * 368 / bgr.shape[0]  # scale_search [0.5] x boxsize 368, as in Body.__call__
    resized = util.smart_resize_k(np.ascontiguousarray(bgr), fx=scale, fy=scale)
    padded, _ = util.padRightDownCorner(resized, 8, 128)
    return np.ascontiguousarray(np.transpose(np.float32(padded[:, :, :, np.newaxis]), (3, 2, 0, 1)) / 256 - 0.5)


def forward(network, inputs: list[np.ndarray], batch_size: int, device: torch.device) -> None:
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(np.concatenate(inputs[start : start + batch_size])).to(device)
            paf, heat = network(batch)
            paf.cpu(), heat.cpu()  # controlnet-aux copies both maps back for its post-processing


def measure_network(network, inputs: list[np.ndarray], batch_size: int, device: torch.device) -> dict:
    warm_up = timed(device, lambda: forward(network, inputs[:batch_size], batch_size, device))
    seconds = timed(device, lambda: forward(network, inputs, batch_size, device))
    return rate(len(inputs), seconds, "images/s", batch_size=batch_size, warm_up_s=warm_up,
                input_shape=list(inputs[0].shape[1:]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32, help="timed images per phase, rounded up to whole batches")
    ap.add_argument("--batch-size", type=int, default=None, help="default: configs/full.yaml gen_pose.batch_size")
    ap.add_argument("--detect-resolution", type=int, default=None, help="default: gen_pose.detect_resolution")
    ap.add_argument("--image-size", type=int, default=1024, help="side of the square input images (generated: 1024)")
    add_common_args(ap)
    args = ap.parse_args()

    settings = locked_config("full").gen_pose
    batch_size = args.batch_size or settings.batch_size
    detect_resolution = args.detect_resolution or settings.detect_resolution
    n_images = round_up(args.images, batch_size)
    if args.dry_run:
        from controlnet_aux.open_pose.model import bodypose_model

        with torch.device("meta"):
            network = bodypose_model()
        print(f"{'body':10s} {sum(p.numel() for p in network.parameters()) / 1e6:10.1f} M parameters")
        print(f"dry run ok: {n_images} images per phase, batches of {batch_size}, detect_resolution {detect_resolution}")
        return 0
    device = device_or_exit(args.device, "bench_openpose_gpu")
    if device is None:
        return 2

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
              for _ in range(min(n_images, 8))]
    images = [images[i % len(images)] for i in range(n_images)]
    results = Results(args.json, "openpose", gpu=device_name(device), torch=torch.__version__,
                      detect_resolution=detect_resolution, image_size=args.image_size, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_openpose(folder)  # random weights, controlnet-aux's full-size body network
        detector = load_pose_detector(folder, str(device))

        def per_image() -> dict:
            def run(batch): return detect_poses(batch, detector, detect_resolution, settings.image_resolution)
            warm_up = timed(device, lambda: run(images[:1]))
            return rate(n_images, timed(device, lambda: run(images)), "images/s", batch_size=1, warm_up_s=warm_up)

        results.phase("detect_per_image", "the pose stages' call: network one image at a time + CPU post-processing",
                      per_image)
        inputs = [network_input(im, detect_resolution) for im in images]
        network = detector.body_estimation.model
        results.data["parameters"] = sum(p.numel() for p in network.parameters())
        results.phase("network_per_image", "body network forward only, one image per call",
                      lambda: measure_network(network, inputs, 1, device))
        results.phase("network_batched", f"body network forward only, batches of {batch_size}",
                      lambda: measure_network(network, inputs, batch_size, device))
    return results.exit_code()


if __name__ == "__main__":
    sys.exit(main())

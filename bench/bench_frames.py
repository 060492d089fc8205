"""Frame extraction: decord, both frames of a clip in one batched call (what the `frames` stage
does) vs. PyAV seeking to each timestamp and decoding forward, frame by frame (the baseline).

    python bench/bench_frames.py [--clips 12] [--seconds 20]

Prints clips/s for both and the ratio, measured in this process on the same files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import av
import decord

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.fixtures.sample_oops import render_clip  # noqa: E402
from pab_build.stages.frames import (
    frame_index,
    transition_times,  # noqa: E402
)


def decord_batched(path: str, fail_t: float) -> None:
    vr = decord.VideoReader(path, num_threads=1)
    n, fps = len(vr), vr.get_avg_fps()
    t_n, t_a = transition_times(fail_t, n / fps)
    vr.get_batch([frame_index(t_n, fps, n), frame_index(t_a, fps, n)]).asnumpy()


def pyav_seek(path: str, fail_t: float) -> None:
    with av.open(path) as c:
        s = c.streams.video[0]
        length = float(s.duration * s.time_base)
        for t in transition_times(fail_t, length):
            c.seek(int(t / s.time_base), stream=s, backward=True, any_frame=False)
            for frame in c.decode(s):
                if frame.time is not None and frame.time >= t - 1e-6:
                    frame.to_ndarray(format="rgb24")
                    break


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        clips = []
        for i in range(args.clips):
            p = os.path.join(d, f"clip{i}.mp4")
            render_clip(p, args.seconds, args.seconds * 0.4, (150, 160 + i, 170), (20, 30, 40))
            clips.append((p, args.seconds * 0.4))
        results = {}
        for name, fn in [("pyav_seek (baseline)", pyav_seek), ("decord_batched", decord_batched)]:
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for p, t in clips:
                    fn(p, t)
                best = min(best, time.perf_counter() - t0)
            results[name] = args.clips / best
            print(f"{name:22s} {results[name]:8.1f} clips/s")
        ratio = results["decord_batched"] / results["pyav_seek (baseline)"]
        print(f"ratio decord_batched / pyav_seek = {ratio:.2f}x  ({args.clips} clips of {args.seconds:g}s)")


if __name__ == "__main__":
    main()

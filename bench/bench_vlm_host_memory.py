"""Host memory of loading Qwen2-VL: loaded into host RAM then moved (`.to(device)`, the old path)
vs. straight onto the device (`device_map=device`, :class:`pab_build.models.vlm.TransformersBackend`).

    python bench/bench_vlm_host_memory.py [--device cuda] [--size tiny|medium]

Each load runs in its own process under ``/usr/bin/time -v`` (memory measured from outside the
process: "Maximum resident set size"), next to a baseline process that imports the same libraries
and loads nothing. ``medium`` is a random Qwen2-VL of ~0.2 B parameters built from the tiny
fixture with wider, deeper configs (bfloat16 weights ~0.4 GB); ``tiny`` is the fixture itself. On
a CPU both paths end with the weights in host memory: the difference shows with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MEDIUM = dict(text={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 12,
                    "num_attention_heads": 64, "num_key_value_heads": 8},  # head_dim 16 = 2 x sum(mrope_section)
              vision={"hidden_size": 1024, "embed_dim": 256, "depth": 8, "num_heads": 8})


def child(mode: str, path: str, device: str) -> None:
    sys.path.insert(0, ROOT)
    import torch  # noqa: F401
    from transformers import Qwen2VLForConditionalGeneration

    from pab_build.models.vlm import TransformersBackend

    if mode == "to_device":
        Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    elif mode == "device_map":
        TransformersBackend(path, model_id="bench", device=device, dtype="bfloat16", trust_remote_code=False)


def max_rss_mib(mode: str, path: str, device: str) -> float:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", mode, "--path", path, "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=("tiny", "medium"), default="medium")
    ap.add_argument("--child", choices=("baseline", "to_device", "device_map"))
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.path, args.device)
    sys.path.insert(0, ROOT)
    from pab_build.fixtures.tiny_qwen2vl import build_tiny_qwen2vl

    with tempfile.TemporaryDirectory() as d:
        build_tiny_qwen2vl(d, 0, **(MEDIUM if args.size == "medium" else {}))
        weights = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        rss = {m: round(max_rss_mib(m, d, args.device), 1) for m in ("baseline", "to_device", "device_map")}
    loaded = {m: round(rss[m] - rss["baseline"], 1) for m in ("to_device", "device_map")}
    print(json.dumps({"device": args.device, "size": args.size, "weights_file_mib": round(weights / 2**20, 1),
                      "max_rss_mib": rss, "above_baseline_mib": loaded,
                      "device_map_vs_to_device": round(rss["device_map"] / rss["to_device"], 3)}, indent=1))


if __name__ == "__main__":
    main()

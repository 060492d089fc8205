"""Download the wheels an air-gapped GPU machine lacks, for ``pip install --no-index`` there.

    python bench/wheelhouse.py [--python-version 3.12] [--dest wheelhouse]      # or: make wheelhouse

The requirements are pab-build's own dependencies (pyproject.toml: what a GPU worker imports, a
superset of what bench/gpu.sh imports). pip resolves them for the target (``--python-version``,
``--platform``, binary wheels only) against a stand-in of the target's environment made from
bench/target-base.txt, so only what the image lacks is resolved; those wheels are downloaded with
``pip download --no-deps`` into ``--dest``, next to a

``requirements.txt``: those packages, pinned; ``bench-requirements.txt``: the part of them that the
GPU benchmarks need (what ``bench/gpu.sh --wheelhouse`` installs); ``target-assumed.txt``: the
image's packages of unknown version assumed to fit.

On the target: ``pip install --no-index --no-deps --find-links DIR -r DIR/requirements.txt``
(into a venv that sees the image's packages, or ``--target`` a folder put on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_FILE = os.path.join(ROOT, "bench", "target-base.txt")
# the manylinux tags a glibc 2.28+ x86_64 machine accepts (pip takes the first that a wheel has)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")


UNKNOWN_VERSION = "999"
MIN_PIP = 24
# what bench/gpu.sh imports, by pyproject name (their own dependencies follow): bench-requirements.txt
BENCH_NEEDS = ("torch", "torchvision", "transformers", "accelerate", "diffusers", "qwen-vl-utils", "controlnet-aux",
               "pydantic", "pyyaml", "pillow", "numpy", "safetensors")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_base(path: str) -> dict[str, str | None]:
    """name -> pinned version (None: some version) of each package the target has."""
    base: dict[str, str | None] = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                base[normalise(name)] = version.strip() or None
    return base


def stub_environment(base: dict[str, str | None], dest: str, python: str = sys.executable) -> str:
    """A venv whose installed distributions are the target image's, as empty ``.dist-info``
    folders: pip resolves against it as against the target, without walking torch's (or any
    other installed package's) dependencies. Unpinned names get version 999, which satisfies
    any lower bound. Returns its python."""
    subprocess.run([python, "-m", "venv", "--without-pip", dest], check=True)
    python = os.path.join(dest, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    for name, version in base.items():
        info = os.path.join(site, f"{name.replace('-', '_')}-{version or UNKNOWN_VERSION}.dist-info")
        os.makedirs(info, exist_ok=True)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version or UNKNOWN_VERSION}\n")
    return python


def project_requirements() -> list[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in platforms:
        flags += ["--platform", p]
    return flags


def resolve(requirements: list[str], stub: str, flags: list[str], workdir: str,
            constraints: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(name, version) of every package pip would install on the target (``stub``) for ``requirements``."""
    req_file, con_file, report = (os.path.join(workdir, n) for n in ("req.txt", "con.txt", "report.json"))
    with open(req_file, "w") as f:
        f.write("\n".join(requirements) + "\n")
    with open(con_file, "w") as f:
        f.writelines(f"{n}=={v}\n" for n, v in constraints)
    subprocess.run([sys.executable, "-m", "pip", "--python", stub, "install", "--dry-run", "--quiet",
                    "--report", report, *flags, "-r", req_file, "-c", con_file], check=True)
    with open(report) as f:
        installs = json.load(f)["install"]
    return sorted((normalise(i["metadata"]["name"]), i["metadata"]["version"]) for i in installs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12)")
    ap.add_argument("--platform", action="append", default=None, help=f"wheel platform tags (default: {PLATFORMS})")
    ap.add_argument("--base", default=BASE_FILE, help="packages the target image has (default bench/target-base.txt)")
    ap.add_argument("--dest", default=os.path.join(ROOT, "wheelhouse"))
    ap.add_argument("--requirement", action="append", default=None,
                    help="what to make installable (default: pyproject.toml's dependencies)")
    ap.add_argument("--bench-only", action="store_true",
                    help="download only bench-requirements.txt's wheels (~45 MB: small enough to carry to a GPU)")
    ap.add_argument("--stub-python", default=sys.executable,
                    help="interpreter of the target's stand-in (pip evaluates dependency markers such as "
                         "python_version with it): best one of the target's Python version; default this one")
    args = ap.parse_args()

    pip_major = int(subprocess.run([sys.executable, "-m", "pip", "--version"], check=True, capture_output=True,
                                   text=True).stdout.split()[1].split(".")[0])
    if pip_major < MIN_PIP:  # older pips refuse --python-version/--platform in a --dry-run
        print(f"wheelhouse: needs pip >= {MIN_PIP} (this one is {pip_major}); run it with a venv's python "
              "after `python -m pip install -U pip` (make wheelhouse does)", file=sys.stderr)
        return 2
    stub_version = subprocess.run([args.stub_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
    if stub_version != args.python_version:
        print(f"wheelhouse: dependency markers are evaluated for Python {stub_version}, the target has "
              f"{args.python_version} (--stub-python pythonX.Y makes them exact)", file=sys.stderr)
    base = read_base(args.base)
    flags = target_flags(args.python_version, args.platform or list(PLATFORMS))
    requirements = args.requirement or project_requirements()
    with tempfile.TemporaryDirectory() as tmp:
        stub = stub_environment(base, os.path.join(tmp, "target"), args.stub_python)
        resolved = resolve(requirements, stub, flags, tmp)
        bench = [r for r in requirements if normalise(re.split(r"[=<>!~ ;\[]", r, maxsplit=1)[0]) in BENCH_NEEDS]
        bench_resolved = resolve(bench, stub, flags, tmp, constraints=resolved)  # the same versions
    missing = [(n, v) for n, v in resolved if n not in base]
    conflicts = [f"{n}=={base[n]} (resolved {v})" for n, v in resolved if base.get(n)]
    if conflicts:  # a pinned version of the image that a requirement rejects: no wheel can fix that
        print(f"wheelhouse: the target image's versions do not satisfy the requirements: {'; '.join(conflicts)}",
              file=sys.stderr)
        return 1
    # an image package of unknown version that the stand-in's 999 did not satisfy (an upper bound):
    # assumed to be a version that does; listed so that a failed import on the target is traced
    assumed = [(n, v) for n, v in resolved if n in base]
    bench_missing = [r for r in bench_resolved if r[0] not in base]
    os.makedirs(args.dest, exist_ok=True)
    wanted = bench_missing if args.bench_only else missing
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", args.dest, *flags,
                        *(f"{n}=={v}" for n, v in wanted)], check=True)
    for name, rows, what in (("requirements.txt", [] if args.bench_only else missing, "what the target lacks"),
                             ("bench-requirements.txt", bench_missing, "the part that bench/gpu.sh needs")):
        with open(os.path.join(args.dest, name), "w") as f:
            f.write(f"# bench/wheelhouse.py --python-version {args.python_version}: {what}\n")
            f.writelines(f"{n}=={v}\n" for n, v in rows)
    with open(os.path.join(args.dest, "target-assumed.txt"), "w") as f:
        f.write("# packages of the target image whose version bench/target-base.txt does not pin, assumed\n"
                "# to satisfy requirements with an upper bound (the version pip chose is shown)\n")
        f.writelines(f"{n}  # resolved {v}\n" for n, v in assumed)
    print(f"wheelhouse {args.dest}: {len(wanted)} wheels{' (gpu.sh part only)' if args.bench_only else ''} "
          f"of the {len(missing)} packages the target lacks: {' '.join(n for n, _ in wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

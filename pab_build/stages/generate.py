"""Stage ``generate``: SDXL / RealVisXL images of every C_n / C_a / C_a+ prompt (paper 3.2).

Each prompt gets ``generate.images_per_caption`` images (75 in the paper); image ``i`` of prompt
``P`` is ``{P}-{i:03d}``, seeded by :func:`image_seed` (a hash of ``run.seed``, ``P`` and ``i``),
so an image's seed does not depend on batching, units or the machine. Every image has its own
CPU ``torch.Generator``, so its initial noise depends on its seed only, on any device.

Reproducibility (measured on the CPU with the tiny pipeline): an image generated alone and the same
image generated inside a batch of 3 differ by ~1e-6 (batched matmul numerics), which flips some
8-bit pixels. So the manifest records the pipeline call each image came from (``batch_first_index``,
``batch_size``: consecutive indices of one prompt, after any out-of-memory halving), and
:func:`regenerate_image` reruns that exact call and takes the image's slot. That reproduces the
file byte for byte on the CPU (tested) with the same dtype and library versions. On CUDA it also
needs deterministic kernels, which this module does not force (not verified on a GPU); across
different hardware images agree only up to floating-point noise.

Sampling settings (scheduler, fp16 weights files, fast paths) are loaded by
:mod:`pab_build.models.sdxl`. Before an image is written, the content filter
(:mod:`pab_build.models.content_filter`, ``generate.content_filter``) may reject it
(``content filter: nsfw``), so no later stage sees a flagged image.

Units are (prompt, chunk of ``images_per_unit`` indices), ids ``{prompt_key}-{chunk:03d}``, so
adding prompts never renumbers existing units, and a crash loses one chunk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from ..config import ConfigError, GenerateConfig, PABConfig, model_id, model_path
from ..manifests import keep, read_manifest_row, read_manifest_table, reject, sorted_by_key
from ..models.content_filter import REASON as CONTENT_FILTER_REASON, content_flags
from ..models.loading import inference, run_halving_on_oom
from ..models.sdxl import apply_fast_paths, build_sdxl_pipeline, load_sdxl_pipeline, weights_variant  # noqa: F401 (bench, tests)
from ..store import Store
from ..engine.units import Context, LazyItems, Stage, Unit

if TYPE_CHECKING:
    import torch  # imported where images are made: planning and finalizing never pay for it

log = logging.getLogger(__name__)

GENERATE = "generate"
LATENT_FACTOR = 8  # SDXL's VAE downsamples 8x; the pipeline rejects sides that are not multiples of 8

# Schedulers keep per-call state (timesteps, step index): one pipeline call at a time per process.
# A process drives one accelerator, so serialising calls costs nothing.
_PIPELINE_LOCK = threading.Lock()


# -- seeds and keys ------------------------------------------------------------------------------
def image_seed(base_seed: int, prompt_key: str, index: int) -> int:
    """The seed of image ``index`` of ``prompt_key``: 63 bits of a sha256, the same everywhere."""
    digest = hashlib.sha256(f"pab-generate/{base_seed}/{prompt_key}/{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # fits a signed int64 manifest column


def image_key(prompt_key: str, index: int) -> str:
    return f"{prompt_key}-{index:03d}"


def image_rel(prompt_key: str, key: str) -> str:
    return f"generate/{prompt_key}/{key}.jpg"


def full_prompt(prompt: str, settings: GenerateConfig) -> str:
    """The text sent to SDXL: ``prompt_prefix + prompt + prompt_suffix`` (put separators in them)."""
    return f"{settings.prompt_prefix}{prompt}{settings.prompt_suffix}"


# -- loading -------------------------------------------------------------------------------------
def load_pipeline_for(cfg: PABConfig):
    spec = cfg.models.sdxl
    return load_sdxl_pipeline(model_path(cfg, "sdxl"), cfg.run.device, spec.dtype, cfg.generate, spec.revision)


# -- generating ----------------------------------------------------------------------------------
def generate_batch(pipe, prompts: list[str], seeds: list[int], settings: GenerateConfig) -> list[np.ndarray]:
    """One pipeline call: float32 HxWx3 arrays in [0, 1] (NaN kept, so :func:`image_problem` sees it)."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    negative = settings.negative_prompt or None  # None: SDXL's zero negative embedding, as upstream
    with _PIPELINE_LOCK, inference(pipe), torch.inference_mode():
        out = pipe(
            prompt=[full_prompt(p, settings) for p in prompts],
            negative_prompt=[negative] * len(prompts) if negative else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=generators,
            output_type="np",
        )
    return [np.asarray(a, dtype=np.float32) for a in out.images]


def generate_arrays(pipe, prompts: list[str], seeds: list[int], settings: GenerateConfig
                    ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Images in batches of ``settings.batch_size`` (halved on out-of-memory), plus, per image,
    ``(position of the first image of its pipeline call, images in that call)``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    calls: list[tuple[int, int]] = []

    def run(batch: list[tuple[int, str, int]]) -> list[np.ndarray]:
        arrays = generate_batch(pipe, [p for _, p, _ in batch], [s for _, _, s in batch], settings)
        calls.extend((batch[0][0], len(batch)) for _ in batch)
        return arrays

    items = [(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
    return run_halving_on_oom(items, settings.batch_size, run), calls


def array_to_image(array: np.ndarray) -> Image.Image:
    """[0, 1] float array -> 8-bit RGB image, rounding as diffusers' ``output_type="pil"`` does."""
    if not np.isfinite(array).all():
        raise ValueError("the image has NaN/inf values; there are no pixels to save")
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))


def image_problem(image_array: np.ndarray, black_threshold: float = 2.0) -> str | None:
    """Why a generated image is unusable (NaN/inf values, black), or None.

    Float arrays are in [0, 1] (the pipeline's ``np`` output); integer arrays in 0..255. Black
    means the mean pixel value, on the 0..255 scale, is below ``black_threshold``.
    """
    a = np.asarray(image_array)
    if a.size == 0:
        return "empty image"
    if np.issubdtype(a.dtype, np.floating):
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            return f"NaN/inf in the generated image ({bad} of {a.size} values)"
        mean = float(a.mean()) * 255.0
    else:
        mean = float(a.mean())
    if mean < black_threshold:
        return f"black image: mean pixel value {mean:.2f} is below black_threshold={black_threshold}"
    return None


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- the stage -----------------------------------------------------------------------------------
def check_image_size(settings: GenerateConfig) -> None:
    for name in ("height", "width"):
        if getattr(settings, name) % LATENT_FACTOR:
            raise ConfigError(f"generate.{name}={getattr(settings, name)} must be a multiple of {LATENT_FACTOR}")


def plan_generate_units(ctx: Context) -> list[Unit]:
    """``images_per_caption`` items per ok prompt (the first ``max_prompts`` prompt keys when
    capped), cut into units of ``images_per_unit`` consecutive indices of one prompt."""
    sec, seed = ctx.cfg.generate, ctx.cfg.run.seed
    check_image_size(sec)
    columns = ["sample_key", "clip_key", "kind", "prompt"]
    prompts = sorted_by_key(read_manifest_table(ctx.store, "prompts", columns, ok_only=True))
    if sec.max_prompts is not None:
        prompts = prompts.slice(0, sec.max_prompts)
    units = []
    n, size = sec.images_per_caption, sec.images_per_unit
    for p in prompts.to_pylist():  # one small dict per prompt; the 75 items per prompt are made per unit
        pk = p["sample_key"]
        for chunk, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            make = partial(prompt_items, pk, p["clip_key"], p["kind"], p["prompt"], seed, start, stop)
            units.append(Unit(GENERATE, f"{pk}-{chunk:03d}", LazyItems(make, stop - start)))
    return units


def prompt_items(pk: str, clip_key: str | None, kind: str | None, prompt: str | None, seed: int, start: int,
                 stop: int) -> list[dict]:
    """The items of images ``start:stop`` of prompt ``pk``."""
    return [{"sample_key": image_key(pk, i), "prompt_key": pk, "clip_key": clip_key, "kind": kind,
             "prompt": prompt, "index": i, "seed": image_seed(seed, pk, i)} for i in range(start, stop)]


def _row_fields(it: dict, cfg: PABConfig) -> dict[str, Any]:
    return {k: it.get(k) for k in ("prompt_key", "clip_key", "kind", "index", "seed", "prompt")} | {
        "model_id": model_id(cfg, "sdxl")
    }


def run_generate_unit(ctx: Context, unit: Unit) -> list[dict]:
    sec = ctx.cfg.generate
    rows: dict[str, dict] = {}
    todo = []
    for it in unit.items:
        if not (it.get("prompt") or "").strip():
            rows[it["sample_key"]] = reject(it, "empty prompt in the prompts manifest", **_row_fields(it, ctx.cfg))
        else:
            todo.append(it)
    todo_by_key = {it["sample_key"]: it for it in todo}
    if todo:
        pipe = load_pipeline_for(ctx.cfg)
        arrays, calls = generate_arrays(pipe, [it["prompt"] for it in todo], [it["seed"] for it in todo], sec)
        images: dict[str, tuple[Image.Image, dict]] = {}
        for it, array, (first, size) in zip(todo, arrays, calls):
            fields = _row_fields(it, ctx.cfg) | {
                "width": int(array.shape[1]), "height": int(array.shape[0]),
                "batch_first_index": todo[first]["index"], "batch_size": size,
            }
            why = image_problem(array, sec.black_threshold)
            if why:
                rows[it["sample_key"]] = reject(it, why, **fields)
            else:
                images[it["sample_key"]] = (array_to_image(array), fields)
        # the content filter sees the 8-bit image the file is made of, before anything is written
        flags = content_flags(ctx.cfg, [im for im, _ in images.values()]) if sec.content_filter else []
        for (key, (image, fields)), flagged in zip(images.items(), flags or [False] * len(images)):
            it = todo_by_key[key]
            if flagged:
                rows[key] = reject(it, CONTENT_FILTER_REASON, **fields)
                continue
            rel = image_rel(it["prompt_key"], key)
            digest = ctx.store.write_bytes(rel, encode_jpeg(image, sec.jpeg_quality))
            rows[key] = keep(it, **fields, image_path=rel, image_sha256=digest)
    return [rows[k] for k in unit.sample_keys]


def regenerate_image(cfg: PABConfig, sample_key_or_row: str | dict, store: Store | None = None) -> Image.Image:
    """Regenerate one image from its manifest row (or its key, read from ``store``'s manifest).

    Reruns the row's recorded pipeline call (its batch) and returns the image's slot, so the
    result equals the original bit for bit under the same ``generate`` / ``models.sdxl`` config,
    device type, dtype and library versions (see the module docstring for why a lone call is not
    enough). ``cfg.run.seed`` must be the build's: the recorded seed is checked against it.
    """
    if isinstance(sample_key_or_row, dict):
        row = sample_key_or_row
    else:
        if store is None:
            raise ValueError("regenerate_image needs the store to look up a sample key")
        keys = read_manifest_table(store, GENERATE, ["sample_key"])["sample_key"]  # 1.5M keys, then one row
        at = pc.index(keys, sample_key_or_row).as_py()
        found = [read_manifest_row(store, GENERATE, at)] if at >= 0 else []
        if not found:
            raise KeyError(f"{sample_key_or_row!r} is not in the generate manifest")
        row = found[0]
    key = row["sample_key"]
    if row.get("seed") is None or not row.get("prompt") or row.get("batch_size") is None:
        raise ValueError(f"{key}: the manifest row records no seed/prompt/batch (reason: {row.get('reason')})")
    pk, first, size = row["prompt_key"], row["batch_first_index"], row["batch_size"]
    seeds = [image_seed(cfg.run.seed, pk, i) for i in range(first, first + size)]
    slot = row["index"] - first
    if not 0 <= slot < size or seeds[slot] != row["seed"]:
        raise ValueError(f"{key}: recorded seed {row['seed']} is not image_seed(run.seed={cfg.run.seed}, "
                         f"{pk!r}, {row['index']}); was it built with another run.seed?")
    check_image_size(cfg.generate)
    pipe = load_pipeline_for(cfg)
    arrays = generate_batch(pipe, [row["prompt"]] * size, seeds, cfg.generate)
    return array_to_image(arrays[slot])


STAGE = Stage(
    name=GENERATE,
    plan_units=plan_generate_units,
    run_unit=run_generate_unit,
    config_keys=(GENERATE, "models.sdxl", "models.safety_checker", "run.seed"),
    version="2",  # 2: scheduler, weights variant, VAE slicing, content filter settings
    uses_gpu=True,
)

"""Stage ``frames``: the middle frame before (normal) and after (anomaly) each OOPS! failure.

Paper 3.1: "We extract middle frames from the video segments before and after the timestamps as
pedestrian normal and anomaly images". With failure time ``t`` (median of the annotators) and clip
length ``len``: normal at ``t / 2``, anomaly at ``(t + len) / 2``. Frames are decoded with decord,
both frames of a clip in one batched call.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading

import numpy as np
from PIL import Image

from .. import oops
from ..config import oops_root
from ..manifests import keep, reject
from ..shards.pairing import BEHAVIORS
from ..engine.units import Context, Stage, Unit, chunk_units



# decord prefixes its errors with a wall-clock time and a source location: drop both, so reasons
# (and manifests) are reproducible
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {_DECORD_PREFIX.sub('', str(e)).strip()[:200]}"


def demux_problem(path: str) -> str | None:
    """Read every packet of the video stream with PyAV (no decoding) and compare with the frame
    count the container declares. A file that cannot be demuxed, or holds fewer packets than it
    declares (truncated), is rejected here: decord's reader fails on such files in its constructor
    and can then abort the whole process at exit (seen with truncated mp4s)."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            declared = stream.frames
            present = sum(1 for p in container.demux(stream) if p.size > 0)
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types
        return f"unreadable: {type(e).__name__}: {str(e).replace(path, os.path.basename(path))[:200]}"
    if declared and present < declared:
        return f"truncated: {present} of {declared} frames present"
    return None


def regular_file(path: str) -> bool:
    """True for a regular file (after symlinks); False for pipes, devices, folders, missing paths."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def with_deadline(fn, timeout_s: float, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread; :class:`TimeoutError` after ``timeout_s``. A hung
    decoder thread is abandoned (it cannot be killed) but never blocks the unit or the exit."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            result["error"] = e

    worker = threading.Thread(target=target, name="frames-decode", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"no result after {timeout_s:g}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def transition_times(failure_t: float, length_s: float) -> tuple[float, float]:
    """(normal, anomaly) timestamps: the middles of the segments before and after the failure."""
    return failure_t / 2.0, (failure_t + length_s) / 2.0


def frame_index(time_s: float, fps: float, n_frames: int) -> int:
    """The frame shown at ``time_s`` (frame i covers [i/fps, (i+1)/fps))."""
    return int(min(max(int(time_s * fps), 0), n_frames - 1))


def sample_key(clip_key: str, behavior: str) -> str:
    return f"{clip_key}-{behavior}"


def plan_frames_units(ctx: Context) -> list[Unit]:
    cfg = ctx.cfg
    clips = oops.load_clips(oops_root(cfg), list(cfg.oops.splits))
    if cfg.oops.limit is not None:
        clips = clips[: cfg.oops.limit]
    items = []
    for c in clips:
        st = os.stat(c.video_path) if c.video_path and os.path.exists(c.video_path) else None
        for b in BEHAVIORS:
            cap = c.captions[0] if c.captions else None
            items.append({
                "sample_key": sample_key(c.clip_key, b),
                "clip_name": c.clip_name,
                "clip_key": c.clip_key,
                "split": c.split,
                "behavior": b,
                "video_path": c.video_path,
                # size + mtime stand in for the video's content in the unit's input hash
                "video_stat": [st.st_size, st.st_mtime_ns] if st else None,
                "times": list(c.times),
                "length_s": c.length_s,
                "rel_t": list(c.rel_t) if c.rel_t else None,
                "source_caption": (cap.goal if b == "normal" else cap.wentwrong) if cap else None,
                # only when set, so the input hash of a clean clip's unit stays what it was
                **({"problem": c.problem} if c.problem else {}),
            })
    return chunk_units("frames", items, cfg.frames.clips_per_unit, group_key="clip_key")


def _encode_jpeg(frame: np.ndarray, quality: int, max_side: int | None) -> tuple[bytes, int, int]:
    img = Image.fromarray(frame).convert("RGB")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.width, img.height


def extract_transition_frames(ctx: Context, clip_items: list[dict]) -> list[dict]:
    """Both frames of one clip -> two manifest rows (ok with an image, or rejected with a reason)."""
    import decord  # imported here: decord is heavy and only this stage needs it

    cfg = ctx.cfg
    first = clip_items[0]
    base = {k: first[k] for k in ("clip_name", "clip_key", "split")}

    def reject_all(reason: str, **extra) -> list[dict]:
        if first["video_path"]:  # keep manifests free of absolute paths
            reason = reason.replace(first["video_path"], os.path.basename(first["video_path"]))
        return [reject(it, reason, **base, behavior=it["behavior"], source_caption=it["source_caption"], **extra)
                for it in clip_items]

    if first.get("problem"):
        return reject_all(first["problem"])
    if not first["video_path"]:
        return reject_all(f"video missing: no oops_video/{first['split']}/{first['clip_name']}.* file")
    if not regular_file(first["video_path"]):  # a FIFO or device would block the reader forever
        return reject_all(f"video is not a regular file: oops_video/{first['split']}/"
                          f"{os.path.basename(first['video_path'])}")
    clip = oops.ClipRecord(first["clip_name"], first["clip_key"], first["split"], first["video_path"],
                           tuple(first["times"]), first["length_s"],
                           tuple(first["rel_t"]) if first["rel_t"] else None, ())
    timeout = cfg.frames.decode_timeout_s
    try:
        problem = with_deadline(demux_problem, timeout, first["video_path"])
    except TimeoutError:
        return reject_all(f"video probe took longer than frames.decode_timeout_s={timeout:g}s")
    if problem:
        return reject_all(f"video {problem}")
    try:
        vr = with_deadline(decord.VideoReader, timeout, first["video_path"], num_threads=1)
        n_frames, fps = len(vr), float(vr.get_avg_fps())
    except TimeoutError:
        return reject_all(f"video open took longer than frames.decode_timeout_s={timeout:g}s")
    except Exception as e:  # noqa: BLE001 - decord raises its own error types
        return reject_all(f"video undecodable: {_error_text(e)}")
    if n_frames <= 0 or fps <= 0:
        return reject_all(f"video has no frames (frames={n_frames}, fps={fps})")
    video_len = n_frames / fps
    length = clip.length_s if clip.length_s is not None else video_len
    failure_t = clip.failure_time_s
    extra = {"failure_time_s": failure_t, "duration_s": length}
    why = oops.filter_reason(clip, length, min_rel_t=cfg.oops.min_rel_t, max_rel_t=cfg.oops.max_rel_t,
                             min_len_s=cfg.oops.min_len_s, max_len_s=cfg.oops.max_len_s)
    if why:
        return reject_all(why, **extra)
    wanted = dict(zip(BEHAVIORS, transition_times(failure_t, length)))
    for b, t in wanted.items():
        if t * fps > n_frames:  # past the end: the file is shorter than its annotated length
            return reject_all(f"video truncated: {b} frame at {t:.2f}s but the video ends at {video_len:.2f}s",
                              **extra)
    idx = {b: frame_index(t, fps, n_frames) for b, t in wanted.items()}
    try:
        batch = with_deadline(lambda: vr.get_batch([idx["normal"], idx["anomaly"]]).asnumpy(), timeout)
    except TimeoutError:
        return reject_all(f"video decode took longer than frames.decode_timeout_s={timeout:g}s", **extra)
    except Exception as e:  # noqa: BLE001
        return reject_all(f"video undecodable at frames {idx['normal']}/{idx['anomaly']}: "
                          f"{_error_text(e)}", **extra)
    rows = []
    for it, frame in zip(sorted(clip_items, key=lambda x: BEHAVIORS.index(x["behavior"])), batch):
        b = it["behavior"]
        data, w, h = _encode_jpeg(frame, cfg.frames.jpeg_quality, cfg.frames.max_side)
        rel = f"frames/{it['sample_key']}.jpg"
        digest = ctx.store.write_bytes(rel, data)
        rows.append(keep(it, **{
            **base, "behavior": b, **extra,
            "time_s": idx[b] / fps, "frame_index": idx[b], "source_caption": it["source_caption"],
            "image_path": rel, "image_sha256": digest, "width": w, "height": h,
        }))
    return rows


def run_frames_unit(ctx: Context, unit: Unit) -> list[dict]:
    """Every clip on its own: a clip that raises is tried once more, then only its two rows are
    rejected with the error, so one bad clip never takes the other clips of its unit with it."""
    by_clip: dict[str, list[dict]] = {}
    for it in unit.items:
        by_clip.setdefault(it["clip_key"], []).append(it)
    rows: list[dict] = []
    for items in by_clip.values():
        for attempt in (1, 2):
            try:
                rows.extend(extract_transition_frames(ctx, items))
                break
            except Exception as e:  # noqa: BLE001 - any error of this clip is this clip's reason
                if attempt == 2:
                    rows.extend(reject(it, f"clip failed twice: {_error_text(e)}", clip_name=it["clip_name"],
                                       clip_key=it["clip_key"], split=it["split"], behavior=it["behavior"],
                                       source_caption=it["source_caption"]) for it in items)
    return rows


STAGE = Stage(
    name="frames",
    plan_units=plan_frames_units,
    run_unit=run_frames_unit,
    config_keys=("oops", "frames"),
)

"""OpenPose body post-processing in torch, on the network's device, batched over images.

controlnet-aux's ``Body.__call__`` runs its network once per image and then, in NumPy on the CPU,
upsamples all 57 output maps twice with OpenCV's Lanczos (x8, then to the detect size), smooths 18
heatmaps with ``scipy.ndimage.gaussian_filter(sigma=3)``, finds peaks, scores every candidate limb on
the part affinity fields (PAFs) with a Python double loop and assembles people: ~0.5 s per 1024 px
image, serial in every GPU worker. Same network, same weights, same steps, here:

* the two resizes and the Gaussian are linear and separable, so the smoothed heatmap of a network map
  ``X`` (h x w) is ``Sy @ X @ Sx.T`` with ``Sy = G_H @ Ry`` (H x h) and ``Sx = G_W @ Rx`` (W x w): one
  pair of small matmuls per map, on the device. ``Ry`` / ``Rx`` are read off controlnet-aux's own resize
  chain (``util.smart_resize_k``, crop, ``util.smart_resize``) applied to basis maps, so OpenCV's
  kernel, border and INTER_AREA/LANCZOS4 choice are taken as they are, not re-derived; ``G`` is scipy's
  filter applied to an identity. Cached per shape.
* peaks: the 4-neighbour ``>=`` test with zero borders (controlnet-aux's test; a 3x3 max-pool would
  also compare diagonals and drop ties differently) and ``> thre1``, all parts of all images at once;
* the unsmoothed heatmap at a peak and the PAFs at the 10 sample points of every candidate limb of
  every image are ``Ry[y] @ X @ Rx[x]``: gathered, never upsampled in full;
* the greedy limb choice and the assembly into people stay in Python (a few hundred operations per
  image; see bench/bench_pose_postprocess.py).

:func:`body_poses` returns controlnet-aux's ``(candidate, subset)`` per image, so its
``format_body_result`` and renderer read them unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Body.__call__'s constants
BOXSIZE, SCALE, STRIDE, PAD_VALUE = 368, 0.5, 8, 128
THRE1, THRE2, MID_NUM, SIGMA = 0.1, 0.05, 10, 3.0
# limb k joins parts LIMB_SEQ[k] (0-based); its PAF is channels PAF_IDX[k] (x, y)
LIMB_SEQ = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
            (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
PAF_IDX = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
           (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))


# -- network input (Body.__call__'s, one image) ---------------------------------------------------
def network_input(bgr: np.ndarray, network_height: float = SCALE * BOXSIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """``[1, 3, h8, w8]`` float32 for the body network (the image ``network_height`` rows high: 184 is
    controlnet-aux's own), and the (height, width) before padding."""
    from controlnet_aux.open_pose import util

    scale = network_height / bgr.shape[0]
    resized = util.smart_resize_k(bgr, fx=scale, fy=scale)
    padded, _ = util.padRightDownCorner(resized, STRIDE, PAD_VALUE)
    data = np.transpose(np.float32(padded[:, :, :, np.newaxis]), (3, 2, 0, 1)) / 256 - 0.5
    return np.ascontiguousarray(data), resized.shape[:2]


# -- the linear maps ------------------------------------------------------------------------------
def aux_upsample(x: np.ndarray, resized_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """controlnet-aux's chain for one network map (2-D): x8, crop the padding, resize to the image."""
    from controlnet_aux.open_pose import util

    up = util.smart_resize_k(x, fx=STRIDE, fy=STRIDE)[: resized_hw[0], : resized_hw[1]]
    return util.smart_resize(up, out_hw)


@functools.lru_cache(maxsize=16)
def resize_matrices(net_hw: tuple[int, int], resized_hw: tuple[int, int],
                    out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(Ry [H, h], Rx [W, w])`` with ``aux_upsample(X) == Ry @ X @ Rx.T`` (float64). Column c of
    ``Rx`` is the chain applied to a map that is 1 on column c (its rows are ``Rx[:, c]`` times the
    row sums of ``Ry``, which are 1: OpenCV normalises its kernel and replicates borders)."""
    (h, w) = net_hw
    rx = np.empty((out_hw[1], w))
    for c in range(w):
        basis = np.zeros((h, w), np.float32)
        basis[:, c] = 1
        rx[:, c] = aux_upsample(basis, resized_hw, out_hw).astype(np.float64).mean(axis=0)
    ry = np.empty((out_hw[0], h))
    for r in range(h):
        basis = np.zeros((h, w), np.float32)
        basis[r, :] = 1
        ry[:, r] = aux_upsample(basis, resized_hw, out_hw).astype(np.float64).mean(axis=1)
    return ry, rx


@functools.lru_cache(maxsize=16)
def gaussian_matrix(n: int) -> np.ndarray:
    """``G @ v == scipy.ndimage.gaussian_filter1d(v, SIGMA)`` (reflect borders, truncate 4)."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.eye(n), SIGMA, axis=0)


@functools.lru_cache(maxsize=16)
def _device_maps(net_hw, resized_hw, out_hw, device: str) -> dict[str, torch.Tensor]:
    ry, rx = resize_matrices(net_hw, resized_hw, out_hw)
    dev = torch.device(device)
    return {
        "sy": torch.from_numpy(gaussian_matrix(out_hw[0]) @ ry).to(dev),
        "sx": torch.from_numpy(gaussian_matrix(out_hw[1]) @ rx).to(dev),
        "ry": torch.from_numpy(ry).to(dev),
        "rx": torch.from_numpy(rx).to(dev),
    }


# -- post-processing ------------------------------------------------------------------------------
def _peaks(heat: torch.Tensor, maps: dict) -> torch.Tensor:
    """``[n, 4]`` (image, part, y, x) of the smoothed heatmaps' peaks, in controlnet-aux's order."""
    # float64: a flat map's neighbours differ by ~1e-7, float32's error here is ~4e-8 (new peaks)
    smooth = maps["sy"] @ (heat[:, :18].double() @ maps["sx"].T)  # [B, 18, H, W]
    height, width = smooth.shape[-2:]
    found = (smooth > THRE1).nonzero()  # few pixels: the 4-neighbour test runs on those only
    b, c, y, x = found.unbind(1)
    value, keep = smooth[b, c, y, x], torch.ones_like(b, dtype=torch.bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):  # controlnet-aux's test: >= each neighbour;
        ny, nx = y + dy, x + dx  # outside the map it compares with 0, which > THRE1 passes
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        near = smooth[b, c, ny.clamp(0, height - 1), nx.clamp(0, width - 1)]
        keep &= ~inside | (value >= near)
    return found[keep]


def _peak_values(peaks: torch.Tensor, heat: torch.Tensor, maps: dict) -> torch.Tensor:
    """The unsmoothed (upsampled) heatmap at each peak: controlnet-aux's keypoint score."""
    b, c, y, x = peaks.unbind(1)
    rows = (maps["ry"][y][:, None, :] @ heat[b, c].double()).squeeze(1)  # [n, w]
    return (rows * maps["rx"][x]).sum(-1)


def _limb_pairs(peaks: np.ndarray, n_images: int) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Every candidate limb ``(image, limb, row_a, row_b, i, j)`` (rows of ``peaks``; i, j: the
    parts' indices among their part's peaks), in controlnet-aux's (limb, i, j) order; and each
    image's peak rows by part."""
    by_part = [[np.nonzero((peaks[:, 0] == b) & (peaks[:, 1] == p))[0] for p in range(18)]
               for b in range(n_images)]
    out = []
    for b in range(n_images):
        for k, (pa, pb) in enumerate(LIMB_SEQ):
            rows_a, rows_b = by_part[b][pa], by_part[b][pb]
            i, j = np.meshgrid(np.arange(len(rows_a)), np.arange(len(rows_b)), indexing="ij")
            i, j = i.ravel(), j.ravel()
            out.append(np.stack([np.full_like(i, b), np.full_like(i, k), rows_a[i], rows_b[j], i, j], 1))
    pairs = np.concatenate(out).astype(np.int64) if out else np.zeros((0, 6), np.int64)
    return pairs, by_part


def _score_pairs(pairs: np.ndarray, peaks: torch.Tensor, paf_rows: torch.Tensor, rx: torch.Tensor,
                 height: int) -> np.ndarray:
    """``[n, 2]``: (mean PAF score + distance prior, passes both criteria): Body.__call__'s limb test
    for all candidate limbs of all images at once, in float64 with numpy's linspace and rounding.
    ``paf_rows`` is ``Ry @ PAF`` ([B, 38, H, w]): a PAF value is one row of it dotted with ``Rx[x]``."""
    dev = paf_rows.device
    p = torch.from_numpy(pairs).to(dev)
    xy = peaks[:, 2:].to(torch.float64).flip(-1)  # (x, y)
    a, b = xy[p[:, 2]], xy[p[:, 3]]
    norm = (b - a).norm(dim=1).clamp(min=0.001)
    unit = (b - a) / norm[:, None]
    steps = torch.arange(MID_NUM, dtype=torch.float64, device=dev)
    pts = a[:, None, :] + steps[None, :, None] * ((b - a) / (MID_NUM - 1))[:, None, :]  # np.linspace
    pts[:, -1] = b
    pts = pts.round().long()  # half to even, as round() of a numpy float
    chans = torch.tensor(PAF_IDX, device=dev)[p[:, 1]]  # [n, 2]
    rows = paf_rows[p[:, 0, None, None], chans[:, None, :], pts[..., 1, None]]  # [n, 10, 2, w]
    field = (rows * rx[pts[..., 0]][:, :, None, :]).sum(-1)  # [n, 10, 2]
    score = field[..., 0] * unit[:, None, 0] + field[..., 1] * unit[:, None, 1]
    with_prior = score.mean(1) + torch.clamp(0.5 * height / norm - 1, max=0)
    ok = ((score > THRE2).sum(1) > 0.8 * MID_NUM) & (with_prior > 0)
    return torch.stack([with_prior, ok.double()], 1).cpu().numpy()


def _connection(pairs: np.ndarray, scores: np.ndarray, ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """Body.__call__'s greedy choice for one limb of one image: best score first, each peak once.
    Rows: (peak id a, peak id b, score, i, j)."""
    found = sorted(((int(i), int(j), s) for (i, j), (s, ok) in zip(pairs[:, 4:6], scores) if ok),
                   key=lambda c: c[2], reverse=True)  # stable: ties keep (i, j) order, as controlnet-aux's
    connection = np.zeros((0, 5))
    for i, j, s in found:
        if i not in connection[:, 3] and j not in connection[:, 4]:
            connection = np.vstack([connection, [ids_a[i], ids_b[j], s, i, j]])
            if len(connection) >= min(len(ids_a), len(ids_b)):
                break
    return connection


def assemble(candidate: np.ndarray, connections: list[np.ndarray | None]) -> np.ndarray:
    """Body.__call__'s assembly of limbs into people, as it is (it is cheap): ``subset`` rows hold
    the candidate index of each of the 18 parts (-1: none), the total score and the part count."""
    subset = -1 * np.ones((0, 20))
    for k, conn in enumerate(connections):
        if conn is None:
            continue
        index_a, index_b = LIMB_SEQ[k]
        for part_a, part_b, score in conn[:, :3]:
            hits = [j for j in range(len(subset)) if subset[j][index_a] == part_a or subset[j][index_b] == part_b]
            hits = hits[:2]  # controlnet-aux keeps at most two (a third would raise there)
            if len(hits) == 1:
                j = hits[0]
                if subset[j][index_b] != part_b:
                    subset[j][index_b] = part_b
                    subset[j][-1] += 1
                    subset[j][-2] += candidate[int(part_b), 2] + score
            elif len(hits) == 2:
                j1, j2 = hits
                membership = ((subset[j1] >= 0).astype(int) + (subset[j2] >= 0).astype(int))[:-2]
                if len(np.nonzero(membership == 2)[0]) == 0:  # disjoint: merge
                    subset[j1][:-2] += subset[j2][:-2] + 1
                    subset[j1][-2:] += subset[j2][-2:]
                    subset[j1][-2] += score
                    subset = np.delete(subset, j2, 0)
                else:
                    subset[j1][index_b] = part_b
                    subset[j1][-1] += 1
                    subset[j1][-2] += candidate[int(part_b), 2] + score
            elif k < 17:
                row = -1 * np.ones(20)
                row[index_a], row[index_b] = part_a, part_b
                row[-1] = 2
                row[-2] = candidate[int(part_a), 2] + candidate[int(part_b), 2] + score
                subset = np.vstack([subset, row])
    weak = [i for i in range(len(subset)) if subset[i][-1] < 4 or subset[i][-2] / subset[i][-1] < 0.4]
    return np.delete(subset, weak, axis=0)


def postprocess(paf: torch.Tensor, heat: torch.Tensor, resized_hw: tuple[int, int],
                out_hw: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Body.__call__'s ``(candidate, subset)`` for each image of a batch of network outputs
    (``paf [B, 38, h, w]``, ``heat [B, 19, h, w]``, one shape) at detect size ``out_hw``;
    ``resized_hw``: the network input's size before padding."""
    maps = _device_maps(tuple(heat.shape[-2:]), tuple(resized_hw), tuple(out_hw), str(heat.device))
    heat, paf = heat.float(), paf.float()
    # the smoothed maps are float64 [B, 18, H, W]: a few images at a time (1 GiB on a GPU, 128 MiB here)
    per_chunk = max(1, (2**27 if heat.is_cuda else 2**24) // (18 * out_hw[0] * out_hw[1]))
    peaks = torch.cat([_peaks(heat[i : i + per_chunk], maps) + torch.tensor([i, 0, 0, 0], device=heat.device)
                       for i in range(0, len(heat), per_chunk)])
    values = _peak_values(peaks, heat, maps).cpu().numpy()
    peaks_np = peaks.cpu().numpy()
    pairs, by_part = _limb_pairs(peaks_np, len(heat))
    scores = np.zeros((0, 2))
    if len(pairs):
        paf_rows = maps["ry"] @ paf.double()  # [B, 38, H, w]
        scores = _score_pairs(pairs, peaks, paf_rows, maps["rx"], out_hw[0])
    out = []
    for b in range(len(heat)):
        rows = np.concatenate(by_part[b])  # the image's peaks, part by part: candidate order
        ids = np.full(len(peaks_np), -1.0)
        ids[rows] = np.arange(len(rows))
        candidate = np.array([[peaks_np[r, 3], peaks_np[r, 2], values[r], ids[r]] for r in rows], dtype=np.float64)
        connections = []
        for k, (pa, pb) in enumerate(LIMB_SEQ):
            if not len(by_part[b][pa]) or not len(by_part[b][pb]):
                connections.append(None)
                continue
            sel = (pairs[:, 0] == b) & (pairs[:, 1] == k)
            connections.append(_connection(pairs[sel], scores[sel], ids[by_part[b][pa]], ids[by_part[b][pb]]))
        subset = assemble(candidate, connections) if len(rows) else -1 * np.ones((0, 20))
        out.append((candidate if len(rows) else np.array([]), subset))
    return out


def body_poses(body, bgr_images: list[np.ndarray], network_height: float = SCALE * BOXSIZE
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """controlnet-aux's ``Body.__call__`` (network and post-processing) for several BGR images: images
    whose network inputs have the same shape go through the network together, their outputs through
    :func:`postprocess` on the network's device."""
    device = next(iter(body.model.parameters())).device
    inputs = [network_input(bgr, network_height) for bgr in bgr_images]
    groups: dict[tuple, list[int]] = {}
    for n, (data, resized_hw) in enumerate(inputs):
        groups.setdefault((data.shape, resized_hw, bgr_images[n].shape[:2]), []).append(n)
    out: list = [None] * len(bgr_images)
    for (_, resized_hw, out_hw), members in groups.items():
        data = torch.from_numpy(np.concatenate([inputs[n][0] for n in members])).to(device)
        with torch.no_grad():
            paf, heat = body.model(data)
        for n, found in zip(members, postprocess(paf, heat, resized_hw, out_hw)):
            out[n] = found
    return out

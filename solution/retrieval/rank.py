"""Top-k retrieval from features, and the MUGE submission file with the manifest beside it.

:func:`rank` scores every query against the whole gallery by inner product in chunks (bounded
memory, CPU or GPU; ties go to the gallery row that comes first, as in cn_clip's
``make_topk_predictions.py``), in fp32 or through a certified bf16 prefilter (:class:`Prefilter`).
:func:`predict` is the work behind ``python -m solution.predict`` (``bash Chinese-CLIP/predict.sh``):
it reads our ``.npy`` features (+ ``.ids.npy``) or cn_clip's JSONL feature lines (a name without
extension: whatever extraction wrote under it), refuses a file whose recorded kind is the other
one (image and text swapped), and writes, atomically:

- ``NAME.jsonl``: ``{"text_id": int, "image_ids": [k ints]}`` per text, best first
  (``direction="i2t"``: ``{"image_id": int, "text_ids": [k ints]}`` per image);
- ``NAME.json``: the manifest (:func:`.manifest.build_manifest`): checkpoint(s), config, prompt,
  feature files, validation score when known (given, else read from the features' provenance),
  counts, command.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from solution.common import SolutionError, check_output, write_json, write_jsonl
from solution.formats.feature_files import FeatureSet, load_features, resolve_features
from solution.model.precision import exact_math

from .manifest import build_manifest, manifest_path
from .metrics import topk

log = logging.getLogger(__name__)

DIRECTIONS = {"t2i": ("text", "image"), "i2t": ("image", "text")}
DEFAULT_MEMORY_MB = 512


def auto_chunk(gallery_size: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Queries per matrix product so one score block stays within ``memory_mb``."""
    return int(max(1, min(8192, memory_mb * 2**20 // (4 * max(1, gallery_size)))))


def bf16_fast(device) -> bool:
    """Whether a bf16 matrix product beats fp32 here (CPUs with AVX512-BF16 or AMX)."""
    if torch.device(device).type != "cpu":
        return False
    return any(
        bool(getattr(torch.cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)
F32_U = 2.0**-24


class Prefilter:
    """Exact top-k through a bf16 prefilter: bf16 scores pick ``m`` candidates, fp32 rescoring ranks them.

    Certificate (per query ``q``): ``T`` is the bf16 score of the ``m``-th candidate. For any
    gallery row ``g``, with ``~`` the bf16-rounded vectors and ``D = ~x - x`` (known exactly),
    ``|~q.~g - q.g| <= |Dq| max|~g| + |q| max|Dg|`` (Cauchy-Schwarz on the rounding errors); the
    fp32 accumulation adds at most ``gamma_d |~q| max|~g|`` (and as much again for our fp32
    rescoring), and rounding the product to bf16 hides at most ``u |T| / (1 - u)`` above ``T``.
    So no row outside the candidates scores above ``T + eps``; when the exact k-th best candidate
    scores more than that, the candidates hold the true top-k, ties included. Rows where the
    certificate fails (flat score profiles) are redone with the full fp32 product. The products run
    under :func:`.precision.exact_math` (no TF32, no bf16 reduced-precision reductions), which the
    bounds assume.
    """

    def __init__(self, g: torch.Tensor, k: int):
        n, d = g.shape
        self.g, self.k, self.m = g, k, min(n, max(3 * k, 32))
        self.gb = g.bfloat16()
        gt = self.gb.float()
        self.gt_max = float(gt.norm(dim=1).max())
        self.dg_max = float((gt - g).norm(dim=1).max())
        self.gamma = 3 * d * F32_U / (1 - d * F32_U)

    def __call__(self, q: torch.Tensor, chunk: int, device, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with exact_math():
            return self._rank(q, chunk, device, stats)

    def _rank(self, q: torch.Tensor, chunk: int, device, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        g, k, m = self.g, self.k, self.m
        n = g.shape[0]
        out_s = torch.empty((len(q), k), dtype=torch.float32)
        out_i = torch.empty((len(q), k), dtype=torch.int64)
        redo = []
        sub = 256  # queries per rescoring gather: sub * m * d floats
        for start in range(0, len(q), chunk):
            qc = q[start : start + chunk].to(device)
            qb = qc.bfloat16()
            av, ai = torch.topk(qb @ self.gb.T, m, dim=1)
            threshold = av[:, -1].float()
            qt = qb.float()
            eps = (
                (qt - qc).norm(dim=1) * self.gt_max
                + qc.norm(dim=1) * self.dg_max
                + self.gamma * qt.norm(dim=1) * self.gt_max
                + BF16_U * threshold.abs() / (1 - BF16_U)
            ) * 1.01
            for s0 in range(0, len(qc), sub):
                qs, cand = qc[s0 : s0 + sub], ai[s0 : s0 + sub]
                exact = torch.bmm(g[cand], qs.unsqueeze(2)).squeeze(2)
                order = torch.argsort(cand, dim=1)  # index ascending, then a stable sort by score
                cand, exact = torch.gather(cand, 1, order), torch.gather(exact, 1, order)
                order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, :k]
                cand, exact = torch.gather(cand, 1, order), torch.gather(exact, 1, order)
                rows = slice(start + s0, start + s0 + len(qs))
                out_s[rows], out_i[rows] = exact.cpu(), cand.cpu()
                if m < n:
                    bad = (exact[:, k - 1] <= threshold[s0 : s0 + sub] + eps[s0 : s0 + sub]).nonzero().flatten()
                    redo.extend((bad + start + s0).tolist())
        stats["prefilter_candidates"] = m
        stats["fp32_redone"] = stats.get("fp32_redone", 0) + len(redo)
        if redo:
            s, i = topk(q[redo], g, k, chunk_size=chunk, device=device)
            out_s[redo], out_i[redo] = torch.from_numpy(s), torch.from_numpy(i)
        return out_s, out_i


def rank(
    query_feats,
    gallery_feats,
    gallery_ids,
    k: int,
    *,
    device="cpu",
    chunk_size: int | None = None,
    progress: bool = False,
    method: str = "auto",
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ranked gallery ids [Q, k], scores [Q, k])`` by inner product, best first, ties to the lower row.

    ``method``: ``fp32`` (one fp32 product per chunk, :func:`solution.metrics.topk`), ``prefilter``
    (bf16 candidates + fp32 rescoring with an exactness certificate, same result), or ``auto``
    (prefilter where bf16 is fast and the gallery is large). Runs under
    :func:`.precision.exact_math` (float32 ``highest``) whatever the caller set.
    """
    with exact_math():
        return _rank(
            query_feats,
            gallery_feats,
            gallery_ids,
            k,
            device=device,
            chunk_size=chunk_size,
            progress=progress,
            method=method,
            stats=stats,
        )


def _rank(query_feats, gallery_feats, gallery_ids, k: int, *, device, chunk_size, progress, method, stats):
    gallery_ids = np.asarray(gallery_ids)
    n = len(gallery_ids)
    if k > n:
        raise SolutionError(f"top-{k} asked but the gallery has only {n} items")
    device = torch.device(device)
    if method == "auto":
        method = "prefilter" if bf16_fast(device) and n >= 8 * max(3 * k, 32) else "fp32"
    stats = {} if stats is None else stats
    stats["method"] = method
    chunk = chunk_size or auto_chunk(n, DEFAULT_MEMORY_MB / (2 if method == "prefilter" else 1))
    g = torch.as_tensor(np.ascontiguousarray(gallery_feats, dtype=np.float32)).to(device)
    q = torch.as_tensor(np.ascontiguousarray(query_feats, dtype=np.float32))
    # A few chunks per call: a live progress bar without moving the gallery again per chunk.
    block = chunk * 4
    prefilter = Prefilter(g, k) if method == "prefilter" else None
    scores, idx = [], []
    for start in tqdm(range(0, len(q), block), desc="top-k", unit="block", disable=not progress):
        if method == "prefilter":
            s, i = prefilter(q[start : start + block], chunk, device, stats)
            s, i = s.numpy(), i.numpy()
        else:
            s, i = topk(q[start : start + block], g, k, chunk_size=chunk, device=device)
        scores.append(s)
        idx.append(i)
    if not idx:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    idx_all = np.concatenate(idx)
    return gallery_ids[idx_all].astype(np.int64), np.concatenate(scores)


def prediction_rows(direction: str, query_ids, ranked) -> list[dict]:
    qkind, gkind = DIRECTIONS[direction]
    qkey, gkey = f"{qkind}_id", f"{gkind}_ids"
    return [{qkey: q, gkey: r} for q, r in zip(np.asarray(query_ids).tolist(), np.asarray(ranked).tolist())]


@dataclass(frozen=True)
class Prediction:
    """A submission to write: feature files in, ``output`` (+ its manifest) out, and how to rank."""

    image_feats: str
    text_feats: str
    output: str
    top_k: int = 10
    direction: str = "t2i"
    device: str | torch.device = "cpu"
    chunk_size: int | None = None
    method: str = "auto"
    valid_score: dict | None = None  # for the manifest (else the features' provenance)
    checkpoints: tuple = ()  # named in the manifest when the features carry no provenance
    command: tuple = ()  # recorded in the manifest
    progress: bool = False


def _load_pair(job: Prediction) -> tuple[FeatureSet, FeatureSet]:
    texts, images = load_features(job.text_feats, "text"), load_features(job.image_feats, "image")
    if texts.feats.shape[1] != images.feats.shape[1]:
        raise SolutionError(
            f"text features are {texts.feats.shape[1]}-d but image features "
            f"{images.feats.shape[1]}-d: not from the same model"
        )
    for fs in (texts, images):
        norms = np.linalg.norm(fs.feats, axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            log.warning(
                "%s: features are not L2-normalised (norms %.3g..%.3g); ranking by raw inner product",
                fs.path,
                norms.min(),
                norms.max(),
            )
    return texts, images


def predict(job: Prediction) -> dict:
    """Write ``job``'s submission and manifest; ``{output, manifest, count, seconds, ranking}``."""
    if job.top_k < 1:
        raise SolutionError("--top-k must be at least 1")
    if job.chunk_size is not None and job.chunk_size < 1:
        raise SolutionError("--chunk-size must be at least 1")
    output = Path(job.output)
    mpath = manifest_path(output)
    inputs = [
        p
        for path, kind in ((job.text_feats, "text"), (job.image_feats, "image"))
        for p in resolve_features(path, kind)[1:]
        if p is not None
    ]
    check_output(output, inputs=inputs, what="--output")
    check_output(mpath, inputs=inputs, what="manifest (beside --output)")
    t0 = time.perf_counter()
    texts, images = _load_pair(job)
    query, gallery = (texts, images) if job.direction == "t2i" else (images, texts)
    log.info(
        "%d %s queries against %d %ss, top-%d on %s (loaded in %.1f s)",
        len(query.ids),
        query.kind,
        len(gallery.ids),
        gallery.kind,
        job.top_k,
        job.device,
        time.perf_counter() - t0,
    )
    t1 = time.perf_counter()
    stats: dict = {}
    ranked, _ = rank(
        query.feats,
        gallery.feats,
        gallery.ids,
        job.top_k,
        device=job.device,
        chunk_size=job.chunk_size,
        progress=job.progress,
        method=job.method,
        stats=stats,
    )
    n = write_jsonl(output, prediction_rows(job.direction, query.ids, ranked))
    seconds = time.perf_counter() - t0
    manifest = build_manifest(
        texts,
        images,
        output,
        direction=job.direction,
        top_k=job.top_k,
        valid_score=job.valid_score,
        checkpoints=job.checkpoints,
        command=job.command,
        seconds=seconds,
    )
    manifest["ranking"] = stats
    write_json(mpath, manifest)
    log.info(
        "%d predictions in %.1f s (ranking %.1f s, %s) -> %s (+ %s)",
        n,
        seconds,
        time.perf_counter() - t1,
        ", ".join(f"{k} {v}" for k, v in stats.items()),
        output,
        mpath.name,
    )
    return {"output": str(output), "manifest": str(mpath), "count": n, "seconds": seconds, "ranking": stats}

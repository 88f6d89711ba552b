"""An ensemble's submission (``predict.sh --ensemble ensemble.json``): members encode the test data, scores fuse.

Every member's file is fingerprinted against ``ensemble.json`` before anything loads (a changed
file is refused); each member encodes the test texts with its own config and the test images
through the image cache (with flip TTA, also the flipped images, under their own cache key); fusion
(:func:`solution.ensembles.fusion.rerank_topk`) runs in chunks of queries sized so its working set
stays within ``FUSION_MEMORY_MB``. One member with no re-ranker is ranked by
:func:`solution.retrieval.rank.rank`, exactly as plain ``predict`` ranks that member's features. The
submission and its manifest are written as ``predict`` writes them; the manifest names every member,
weight, the test-time augmentation and the re-ranker.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from solution.common import SolutionError, check_output, write_json, write_jsonl
from solution.data.lmdb_io import LMDBSplit
from solution.ensembles.fusion import FUSION_MEMORY_MB, fusion_chunk, rerank_topk
from solution.formats.muge import read_texts
from solution.retrieval.manifest import manifest_path, now
from solution.retrieval.rank import prediction_rows, rank

from .members import Encoding, check_galleries, encode_member, verify_fingerprint
from .spec import active, read_ensemble

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EnsemblePrediction:
    """A submission from an ``ensemble.json``: the test images and texts in, ``output`` (+ manifest) out."""

    ensemble: str
    image_data: str
    text_data: str
    output: str
    top_k: int = 10
    chunk_size: int | None = None
    method: str = "auto"
    encoding: Encoding = Encoding(precision="amp")  # extraction's default: the same features as features.py
    command: tuple = ()


def _rank(job: EnsemblePrediction, spec: dict, members: list, gallery_ids: np.ndarray, stats: dict) -> np.ndarray:
    rr = spec["rerank"]
    weights = np.asarray([spec["weights"][i] for i in active(spec)])
    galleries = [m.gallery_for(spec["tta"]) for m in members]
    if len(members) == 1 and (rr["method"] == "none" or not rr["temperature"] > 0):
        ranked, _ = rank(
            members[0].queries,
            galleries[0],
            gallery_ids,
            job.top_k,
            device=job.encoding.device,
            chunk_size=job.chunk_size,
            method=job.method,
            stats=stats,
        )
        return ranked
    if job.top_k > len(gallery_ids):
        raise SolutionError(f"top-{job.top_k} asked but the gallery has only {len(gallery_ids)} items")
    chunk = job.chunk_size or fusion_chunk(len(gallery_ids), FUSION_MEMORY_MB, spec["norm"])
    qb = rr["method"] == "qb_norm" and rr["temperature"] > 0
    bank = [(m.bank, g) for m, g in zip(members, galleries)] if qb else None
    _, idx = rerank_topk(
        [(m.queries, g) for m, g in zip(members, galleries)],
        job.top_k,
        weights,
        method=rr["method"],
        temperature=float(rr["temperature"]),
        bank=bank,
        bank_topk=rr.get("bank_topk"),
        norm=spec["norm"],
        norm_temperature=float(spec.get("norm_temperature") or 1.0),
        chunk_size=chunk,
        device=job.encoding.device,
    )
    stats.update(method="fusion", chunk_size=chunk)
    return gallery_ids[idx].astype(np.int64)


def predict_ensemble(job: EnsemblePrediction) -> dict:
    """Write the ensemble's submission and manifest; ``{output, manifest, count, seconds, ranking}``."""
    if job.top_k < 1 or (job.chunk_size is not None and job.chunk_size < 1):
        raise SolutionError("--top-k and --chunk-size must be at least 1")
    t0 = time.perf_counter()
    spec = read_ensemble(job.ensemble)
    output = Path(job.output)
    mpath = manifest_path(output)
    inputs = [job.ensemble, job.text_data, *(m["path"] for m in spec["members"])]
    check_output(output, inputs=inputs, what="--output")
    check_output(mpath, inputs=inputs, what="manifest (beside --output)")
    records = read_texts(job.text_data)
    split = LMDBSplit(job.image_data, need_pairs=False)
    used = [spec["members"][i] for i in active(spec)]
    for m in used:  # every file checked before any model loads
        verify_fingerprint(m)
    rr = spec["rerank"]
    bank = [r.text for r in read_texts(rr["bank"])] if rr["method"] == "qb_norm" and rr["temperature"] > 0 else None
    members = [
        encode_member(
            m["path"],
            split,
            [r.text for r in records],
            job.encoding,
            bank_texts=bank,
            known_fingerprint=m["fingerprint"],
            flip=spec["tta"] == "flip",
        )
        for m in used
    ]
    gallery_ids = check_galleries(members)
    stats: dict = {}
    ranked = _rank(job, spec, members, gallery_ids, stats)
    n = write_jsonl(output, prediction_rows("t2i", [r.text_id for r in records], ranked))
    seconds = time.perf_counter() - t0
    weights = [spec["weights"][i] for i in active(spec)]
    write_json(
        mpath,
        {
            "submission": str(output.resolve()),
            "direction": "t2i",
            "top_k": job.top_k,
            "num_queries": n,
            "gallery_size": len(gallery_ids),
            "checkpoints": [
                {
                    "path": m["path"],
                    "sha256": None,
                    "fingerprint": m["fingerprint"],
                    "weight": w,
                    "arch": m.get("arch"),
                    "used_for": ["text", "image"],
                }
                for m, w in zip(used, weights)
            ],
            "config": None,
            "prompt": None,
            "features": {
                "text": {"data": str(Path(job.text_data).resolve()), "count": n},
                "image": {
                    "data": str(split.split_dir.resolve() / "imgs"),
                    "count": len(gallery_ids),
                    "cache": [m.cache for m in members],
                    **({"flip_cache": [m.flip_cache for m in members]} if spec["tta"] == "flip" else {}),
                },
            },
            "ensemble": {
                "path": str(Path(job.ensemble).resolve()),
                "members": [m["path"] for m in used],
                "weights": weights,
                "norm": spec["norm"],
                "norm_temperature": spec.get("norm_temperature"),
                "tta": spec["tta"],
                "rerank": rr,
            },
            "validation": (spec.get("scores") or {}).get("all"),
            "ranking": stats,
            "created": now(),
            "seconds": round(seconds, 3),
            "command": list(job.command),
        },
    )
    log.info(
        "%d ensemble predictions (%d members) in %.1f s -> %s (+ %s)", n, len(members), seconds, output, mpath.name
    )
    return {"output": str(output), "manifest": str(mpath), "count": n, "seconds": seconds, "ranking": stats}

"""An ensemble's submission (``predict.sh --ensemble ensemble.json``): members encode the test data, scores fuse.

Every member file is fingerprinted against ``ensemble.json`` before any model loads (a changed one is
refused). The fusion runs in query chunks sized for ``FUSION_MEMORY_MB``; one member without a re-ranker is
ranked as plain ``predict`` ranks its features. The manifest names every member, weight, TTA and re-ranker.
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
from solution.retrieval.rank import auto_chunk, prediction_rows, rank

from .members import Encoding, check_galleries, encode_member, verify_fingerprint
from .spec import active, read_ensemble

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EnsemblePrediction:
    """A submission from an ``ensemble.json``: the test images (an LMDB) and texts (MUGE JSONL) in, ``output``
    (+ its manifest) out."""

    ensemble: str
    image_data: str
    text_data: str
    output: str
    top_k: int = 10
    chunk_size: int | None = None
    encoding: Encoding = Encoding(precision="amp")  # extraction's default: the features features.py writes
    command: tuple = ()


def _rank(job: EnsemblePrediction, spec: dict, members: list, weights: list, gallery_ids: np.ndarray):
    """``(ranked gallery ids [Q, k], how they were ranked)``."""
    rr, galleries = spec["rerank"], [m.gallery_for(spec["tta"]) for m in members]
    reranked = rr["method"] != "none" and rr["temperature"] > 0
    if len(members) == 1 and not reranked:
        chunk = job.chunk_size or auto_chunk(len(gallery_ids))
        ranked, _ = rank(
            members[0].queries, galleries[0], gallery_ids, job.top_k, device=job.encoding.device, chunk_size=chunk
        )
        return ranked, {"method": "fp32", "chunk_size": chunk}
    if job.top_k > len(gallery_ids):
        raise SolutionError(f"top-{job.top_k} asked but the gallery has only {len(gallery_ids)} items")
    chunk = job.chunk_size or fusion_chunk(len(gallery_ids), FUSION_MEMORY_MB, spec["norm"])
    _, idx = rerank_topk(
        [(m.queries, g) for m, g in zip(members, galleries)],
        job.top_k,
        np.asarray(weights),
        method=rr["method"],
        temperature=float(rr["temperature"]),
        bank=[(m.bank, g) for m, g in zip(members, galleries)] if reranked and rr["method"] == "qb_norm" else None,
        bank_topk=rr.get("bank_topk"),
        norm=spec["norm"],
        norm_temperature=float(spec.get("norm_temperature") or 1.0),
        chunk_size=chunk,
        device=job.encoding.device,
    )
    return gallery_ids[idx].astype(np.int64), {"method": "fusion", "chunk_size": chunk}


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
    used, weights = [spec["members"][i] for i in active(spec)], [spec["weights"][i] for i in active(spec)]
    for m in used:  # every file checked before any model loads
        verify_fingerprint(m)
    rr = spec["rerank"]
    bank = [r.text for r in read_texts(rr["bank"])] if rr["method"] == "qb_norm" and rr["temperature"] > 0 else None
    texts, flip = [r.text for r in records], spec["tta"] == "flip"
    members = [
        encode_member(
            m["path"], split, texts, job.encoding, bank_texts=bank, flip=flip, known_fingerprint=m["fingerprint"]
        )
        for m in used
    ]
    gallery_ids = check_galleries(members)
    ranked, ranking = _rank(job, spec, members, weights, gallery_ids)
    n = write_jsonl(output, prediction_rows("t2i", [r.text_id for r in records], ranked))
    seconds = time.perf_counter() - t0
    checkpoints = [
        {
            "path": m["path"],
            "sha256": None,
            "fingerprint": m["fingerprint"],
            "weight": w,
            "arch": m.get("arch"),
            "used_for": ["text", "image"],
        }
        for m, w in zip(used, weights)
    ]
    image = {
        "data": str(split.split_dir.resolve() / "imgs"),
        "count": len(gallery_ids),
        "cache": [m.cache for m in members],
    }
    if flip:
        image["flip_cache"] = [m.flip_cache for m in members]
    ensemble = {"path": str(Path(job.ensemble).resolve()), "members": [m["path"] for m in used], "weights": weights}
    ensemble.update({k: spec.get(k) for k in ("norm", "norm_temperature", "tta")}, rerank=rr)
    manifest = {
        "submission": str(output.resolve()),
        "direction": "t2i",
        "top_k": job.top_k,
        "num_queries": n,
        "gallery_size": len(gallery_ids),
        "checkpoints": checkpoints,
        "config": None,
        "prompt": None,
        "features": {"text": {"data": str(Path(job.text_data).resolve()), "count": n}, "image": image},
        "ensemble": ensemble,
        "validation": (spec.get("scores") or {}).get("all"),
        "ranking": ranking,
        "created": now(),
        "seconds": round(seconds, 3),
        "command": list(job.command),
    }
    write_json(mpath, manifest)
    log.info(f"{n} ensemble predictions ({len(members)} members) in {seconds:.1f} s -> {output}")
    return {"output": str(output), "manifest": str(mpath), "count": n, "seconds": seconds, "ranking": ranking}

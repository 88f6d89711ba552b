"""An ensemble folder's files, and ``ensemble.json``'s one reader and writer.

``ensemble.json``: ``version``, ``members`` [{path, fingerprint (:func:`solution.model.fingerprint`), arch,
vision_model, text_model, context_length, text_prompt, image_resolution, embed_dim}], ``weights`` (sum 1),
``norm`` (+ ``norm_temperature``), ``tta`` (none|flip; absent: none), ``rerank`` {method, temperature, bank,
bank_topk}, ``scores`` {select, report, all, members}, ``selection_score``, ``crossfit``, ``hits`` {ensemble,
memberI: per-query hits files relative to the folder}, ``val_data``, ``select_split``, ``seed``, ``created``,
``command``.
"""

from __future__ import annotations

import json
import os

from solution.common import SolutionError, write_json
from solution.ensembles.fusion import NORMS, RERANKERS, check_weights
from solution.formats.kinds import ENSEMBLE_SPEC

from .members import TTAS

NAME, LOG_NAME, PLOT_NAME = ENSEMBLE_SPEC, "ensemble_log.jsonl", "selection.png"
VERSION = 1


def write_ensemble(path: str | os.PathLike, spec: dict) -> None:
    write_json(path, {"version": VERSION, **spec})


def read_ensemble(path: str | os.PathLike) -> dict:
    """A checked ``ensemble.json`` (members, weights, normalisation, re-ranker); one error line otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise SolutionError(f"ensemble file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SolutionError(f"{path} is not a readable ensemble.json: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("members"), list) or not spec["members"]:
        raise SolutionError(f"{path}: no members")
    for m in spec["members"]:
        if not isinstance(m, dict) or not {"path", "fingerprint"} <= set(m):
            raise SolutionError(f"{path}: every member needs a path and a fingerprint")
    try:
        spec["weights"] = check_weights(spec.get("weights"), len(spec["members"])).tolist()
    except (ValueError, TypeError) as e:
        raise SolutionError(f"{path}: {e}") from None
    rerank = spec.get("rerank") or {}
    if spec.get("norm") not in NORMS or rerank.get("method", "none") not in RERANKERS:
        raise SolutionError(f"{path}: unknown normalisation {spec.get('norm')!r} or re-ranker {rerank.get('method')!r}")
    spec["rerank"] = {"method": "none", "temperature": 0.0, "bank": None, "bank_topk": None, **rerank}
    spec["tta"] = spec.get("tta") or "none"
    if spec["tta"] not in TTAS:
        raise SolutionError(f"{path}: unknown test-time augmentation {spec['tta']!r}; choose from {', '.join(TTAS)}")
    return spec


def active(spec: dict) -> list[int]:
    """Indices of the members with a non-zero weight."""
    return [i for i, w in enumerate(spec["weights"]) if w > 0]

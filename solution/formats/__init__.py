"""File formats shared by several stages: one reader and one writer each.

- :mod:`.feature_files`: feature files (``BASE.npy`` + ids + meta, or cn_clip JSONL).
- :mod:`.run_files`: a run folder's ``metrics.jsonl``, ``params.json`` and checkpoint names.
- :mod:`.trials`: a study's ``trials.csv``.
- :mod:`.muge`: MUGE texts JSONL.
- :mod:`.hits`: per-query hits (``BASE.hits.npy`` + query ids).
"""

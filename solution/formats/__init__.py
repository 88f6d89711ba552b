"""File formats shared by several stages: one reader and one writer each.

- :mod:`.features`: feature files (``BASE.npy`` + ids + meta, or cn_clip JSONL).
- :mod:`.runs`: a run folder's ``metrics.jsonl`` and ``params.json``.
- :mod:`.trials`: a study's ``trials.csv``.
- :mod:`.muge`: MUGE texts JSONL.
- :mod:`.hits`: per-query hits (``BASE.hits.npy`` + query ids).
"""

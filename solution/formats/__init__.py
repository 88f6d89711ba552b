"""File formats shared by several stages, one reader and one writer each: feature files, a run folder's files, a
study's ``trials.csv``, MUGE texts, per-query hits, folder kinds."""

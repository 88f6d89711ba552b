"""Raw inputs -> cleaned images -> LMDB in cn_clip's layout; datasets over it; synthetic demo data."""

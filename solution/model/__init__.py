"""Model registry, building, and the checkpoint contract."""

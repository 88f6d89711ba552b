"""Fine-tuning Chinese-CLIP: the loop and ``main`` in :mod:`.trainer`, the flags in :mod:`.flags`."""

"""Chinese-CLIP competition toolkit: prepare -> train -> features -> predict -> evaluate -> soup (see docs/DESIGN.md)."""

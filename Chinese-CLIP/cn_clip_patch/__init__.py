"""The patch layer over upstream cn_clip, applied at run time (upstream files are never edited).

No patch outlives the call that needs it: each is a context manager that restores upstream, or
acts on one model instance.

- :mod:`cn_clip_patch.prompt`: the text prompt prefix and padding-free tokenisation, one place
  for training, validation and inference.
- :mod:`cn_clip_patch.tuning`: LoRA (peft) on both towers, merge back to plain cn_clip weights,
  frozen vision (cn_clip's flag) and frozen text tower (new), ``grad_checkpointing(...)``.
- :mod:`cn_clip_patch.device`: the CPU path: runs upstream code that calls ``Tensor.cuda`` inline
  on any device (used to measure and referee upstream side by side).
- :mod:`cn_clip_patch.attention`: the text tower's self-attention through SDPA, per model instance.
"""

"""The patch layer over upstream cn_clip, applied at run time (upstream files are never edited).

- :mod:`cn_clip_patch.prompt`: the text prompt prefix and padding-free tokenisation, one place
  for training, validation and inference.
- :mod:`cn_clip_patch.tuning`: LoRA (peft) on both towers, merge back to plain cn_clip weights,
  frozen vision (cn_clip's flag) and frozen text tower (new).
- :mod:`cn_clip_patch.device`: the CPU path: runs upstream code that calls ``Tensor.cuda`` inline
  on any device (used to measure and referee upstream side by side).
"""

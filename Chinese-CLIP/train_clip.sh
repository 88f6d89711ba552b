#!/usr/bin/env bash
# Fine-tune Chinese-CLIP: full, LoRA (--lora-rank) or frozen towers (--freeze-vision/--freeze-text),
# with recall validation, checkpoints and exact resume. Accepts cn_clip's training flags
# (--train-data --val-data --batch-size --lr --max-epochs --resume ...) and --config FILE.yaml.
# All flags: bash Chinese-CLIP/train_clip.sh --help
#
# One process (CPU or one GPU), e.g. stage 1 of the progressive fine-tune on the demo data
# (its comments say how to make that data) or a LoRA run on MUGE:
#   bash Chinese-CLIP/train_clip.sh --config configs/train/stage1_general.yaml
#   bash Chinese-CLIP/train_clip.sh --config configs/train/lora_vit-b-16.yaml
# Many GPUs / CPU processes: run the same module under torchrun (NCCL on GPU, gloo on CPU);
# --batch-size is per process, so the global batch is batch-size x processes:
#   torchrun --nproc_per_node 8 -m solution.train --config my.yaml
#   torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 -m solution.train ...
# Re-running the same command after a crash or kill resumes from {logs}/{name}/checkpoints/epoch_latest.pt
# (and first writes any checkpoint the killed run still owed). A re-run whose training flags (lr, batch size,
# steps, model, prompt, LoRA/freeze, ...) differ from {logs}/{name}/params.json is refused, listing them,
# unless --allow-changed-flags; one training at a time writes a run folder (a second is refused).
set -euo pipefail
exec python -m solution.train "$@"

"""Optuna studies over fine-tuning runs: search_config (YAML, space, trial flags), storage (where a study lives,
dead workers), gpus (leases per trial), runner (one trial), study (the study, its budget and its folder's outputs)."""

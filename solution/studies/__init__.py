"""Optuna studies over fine-tuning runs: config (YAML, space, trial flags), storage (where a study
lives, dead workers), study (create or resume, run until the budget is counted), runner (one trial),
report (the study folder's outputs)."""

"""Optuna studies over fine-tuning runs: search_config (YAML, space, trial flags), storage (where a
study lives, dead workers), gpus (leases per trial), study (create or resume, run until the budget is
counted), runner (one trial), report (the study folder's outputs)."""

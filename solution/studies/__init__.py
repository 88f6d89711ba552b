"""Optuna studies over fine-tuning runs: config, storage, runner, report."""

"""Fine-tuning: config, setup, the step, the trainer, run-folder state and safety."""

"""Fine-tuning Chinese-CLIP.

- :mod:`.config`: the command line (flags as typed, checked; ``--config FILE.yaml``).
- :mod:`.run_config`: :class:`~.run_config.TrainConfig`, the frozen resolved configuration, and ``params.json``.
- :mod:`.setup`: processes and devices, the starting checkpoint, the model, optimizer, schedule, scaler.
- :mod:`.loaders`: resumable, rank-aware training and validation data.
- :mod:`.step`: the contrastive step (global batch, accumulation) and the validation loss.
- :mod:`.validation`: scoring the validation sets, the best record, early stop.
- :mod:`.state`: the run folder's files (checkpoints, RNG state, params, metrics, plot).
- :mod:`.guard`: the run-folder lock and the flags a re-run may change.
- :mod:`.trainer`: the loop, and ``main(argv, on_validation=None)``.
"""

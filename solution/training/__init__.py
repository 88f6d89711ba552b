"""Fine-tuning Chinese-CLIP: :mod:`.trainer` (the loop and ``main``), :mod:`.flags` (the flag table),
:mod:`.run_config` (the resolved configuration, ``params.json``, the resume guard), :mod:`.setup`
(processes, starting checkpoint, model, optimizer), :mod:`.loaders`, :mod:`.step`, :mod:`.validation`
and :mod:`.state` (the run folder's files)."""

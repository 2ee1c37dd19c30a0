"""Stage 1: masked-language-model pretraining of the text encoder on a domain corpus.

``config`` (the run's YAML tree), ``corpus`` (shards' train reports + text files -> de-duplicated,
split, packed), ``masking`` (whole-word masking), ``loader`` (the Trainer's loader over packed
sequences) and ``task`` (``MLMTask``, run by the shared ``melp_scale.train.loop.Trainer``).
Entry point: ``launch/pretrain_text.py``.
"""

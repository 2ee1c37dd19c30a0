"""Training: config (YAML presets + overrides), DeepSpeed wiring, the loop, checkpoints, metrics.

The loop (``loop.Trainer``) is generic over a ``task.Task``: ``melp_task.MELPTask`` is stage 2
(``launch/pretrain.py``), ``melp_scale.text_pretrain.task.MLMTask`` stage 1
(``launch/pretrain_text.py``). The library pieces are importable without side effects.
"""

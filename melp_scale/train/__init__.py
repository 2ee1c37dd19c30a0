"""Pretraining: config (YAML presets + overrides), DeepSpeed wiring, the loop, checkpoints, metrics.

``launch/pretrain.py`` is the entry point; the library pieces are importable without side effects.
"""

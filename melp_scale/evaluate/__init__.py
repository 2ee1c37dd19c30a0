"""Downstream evaluation of MELP checkpoints (METHOD.md §5; ``python -m melp_scale.evaluate``).

- tasks.py: the task registry (name -> shard source, label keys, classes, prompt file);
- data.py: labelled shard sets -> per-task labels and splits, cached model features;
- metrics.py: exact rank-based ROC-AUC, ROC curves, bootstrap 95 % CIs;
- zeroshot.py, linear_probe.py, retrieval.py, caption.py: the four evaluations;
- report.py: results JSON, paper-style Markdown tables, ROC PNGs; runner.py ties them together.
"""

"""Downstream evaluation of MELP checkpoints (README, "Evaluation"; ``python -m melp_scale.evaluate``).

- tasks.py: the task registry (name -> shard source, label keys, classes, prompt file);
- data.py: labelled shard sets -> per-task labels and splits, cached model features;
- splitcsv.py: the published MERL/MELP split CSVs (matched by column name, validated);
- provenance.py: what a checkpoint was pretrained on (training_data.json), the leakage check;
- metrics.py: exact rank-based ROC-AUC, ROC curves, bootstrap 95 % CIs;
- zeroshot.py, linear_probe.py, finetune.py, retrieval.py, caption.py, patient_id.py: the
  evaluations;
- report.py: results JSON, paper-style Markdown tables, PNGs; runner.py ties them together.
"""

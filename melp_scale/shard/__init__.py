"""Raw ECG corpora -> WebDataset shards: ``python -m melp_scale.shard build|verify|inspect``."""

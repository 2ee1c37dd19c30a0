"""melp-scale: multi-scale ECG-language pretraining (MELP) at scale.

Subpackages: ``shard`` (raw corpora -> WebDataset shards), ``stream`` (shards -> batches),
``model`` (ECG/text encoders, poolers, decoder, losses), ``train`` and ``evaluate``.
Importing the package has no side effects.
"""

__version__ = "0.1.0"

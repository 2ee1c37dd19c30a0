"""MELP model: ECG encoder, poolers, text encoder, caption decoder, losses, inference API.

    from melp_scale.model import MELP, MELPConfig
    model = MELP(MELPConfig.preset("demo"))
    out = model(batch)            # MELPOutput: loss, loss_global, loss_caption, loss_local, ...
    out.loss.backward(); optimizer.step(); model.clamp_logit_scale_()
"""
from .config import (DecoderConfig, ECGEncoderConfig, LossConfig, MELPConfig, PoolerConfig,
                     PRESETS, TextEncoderConfig)
from .counts import OFFICIAL_MODULES, official_unused_counts, parameter_counts
from .melp import MELP, MELPOutput

__all__ = ["MELP", "MELPConfig", "MELPOutput", "ECGEncoderConfig", "PoolerConfig",
           "TextEncoderConfig", "DecoderConfig", "LossConfig", "PRESETS", "parameter_counts",
           "official_unused_counts", "OFFICIAL_MODULES"]

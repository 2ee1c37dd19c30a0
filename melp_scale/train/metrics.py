"""Observability on rank 0: JSONL metrics, TensorBoard, GPU telemetry (pynvml), retrieval recall."""
from __future__ import annotations

import json
import os
from typing import Any

import torch


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, folder: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(folder, exist_ok=True)
        self.handle = open(os.path.join(folder, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an install extra of torch's writer
                return
            self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.writer is not None:
                self.writer.close()


class GpuTelemetry:
    """Utilisation, memory, power and temperature of this node's GPUs; empty without GPUs."""

    def __init__(self, enabled: bool):
        self.handles = []
        if not (enabled and torch.cuda.is_available()):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver / no NVML: telemetry is optional, silently absent
            self.handles = []

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for index, handle in enumerate(self.handles):
            nvml = self.nvml
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"gpu{index}_util_pct"] = float(util.gpu)
                out[f"gpu{index}_mem_gb"] = memory.used / 1e9
                out[f"gpu{index}_power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                out[f"gpu{index}_temp_c"] = float(
                    nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except Exception:  # a device that stops answering is skipped, not fatal
                continue
        return out


def retrieval_recall(ecg: torch.Tensor, text: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
                     ) -> dict[str, float]:
    """Recall@k of ECG->report and report->ECG retrieval; row i of each is a matching pair."""
    similarity = ecg.float() @ text.float().T  # (N, N)
    target = torch.arange(similarity.shape[0], device=similarity.device)
    out = {}
    for direction, matrix in (("ecg2text", similarity), ("text2ecg", similarity.T)):
        # rank of the true match: how many candidates score strictly higher
        true_scores = matrix[target, target][:, None]
        ranks = (matrix > true_scores).sum(dim=1)
        for k in ks:
            out[f"{direction}_r@{k}"] = float((ranks < k).float().mean())
    return out

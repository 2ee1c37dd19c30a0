"""Draw a sample as a standard 12-lead chart (3 x 4 leads of 2.5 s + a lead II rhythm strip).

Paper speed 25 mm/s and 10 mm/mV on an ECG grid (1 mm = 0.04 s / 0.1 mV, 5 mm major squares).
"""
from __future__ import annotations

import numpy as np

from melp_scale.shard.record import LEADS

LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
COLUMN_SECONDS = 2.5
ROW_HEIGHT_MV = 3.0


def plot_12lead(ecg_mv: np.ndarray, fs: float, title: str, path: str) -> None:
    """Save ``ecg_mv`` (12, T) in mV as a chart at ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = min(ecg_mv.shape[1] / fs, 4 * COLUMN_SECONDS)
    rows = len(LAYOUT) + 1
    width_mm, height_mm = seconds * 25, rows * ROW_HEIGHT_MV * 10
    fig = plt.figure(figsize=(width_mm / 25.4, height_mm / 25.4 + 0.4), dpi=120)
    axis = fig.add_axes([0, 0, 1, height_mm / (height_mm + 10)])
    for x in np.arange(0, seconds + 1e-9, 0.04):
        axis.axvline(x, color="#f4c7c3" if round(x / 0.04) % 5 else "#e8837b", lw=0.3 if round(x / 0.04) % 5 else 0.6)
    for y in np.arange(0, rows * ROW_HEIGHT_MV + 1e-9, 0.1):
        axis.axhline(y, color="#f4c7c3" if round(y / 0.1) % 5 else "#e8837b", lw=0.3 if round(y / 0.1) % 5 else 0.6)
    column_samples = int(COLUMN_SECONDS * fs)
    for row, names in enumerate(LAYOUT):
        baseline = (rows - row - 0.5) * ROW_HEIGHT_MV
        for column, name in enumerate(names):
            start = column * column_samples
            piece = ecg_mv[LEADS.index(name), start:start + column_samples]
            times = (start + np.arange(piece.size)) / fs
            axis.plot(times, baseline + piece, color="black", lw=0.6)
            axis.text(start / fs + 0.05, baseline + 0.8, name, fontsize=7)
    strip = ecg_mv[LEADS.index("II"), : int(seconds * fs)]
    axis.plot(np.arange(strip.size) / fs, 0.5 * ROW_HEIGHT_MV + strip, color="black", lw=0.6)
    axis.text(0.05, 0.5 * ROW_HEIGHT_MV + 0.8, "II", fontsize=7)
    axis.set_xlim(0, seconds)
    axis.set_ylim(0, rows * ROW_HEIGHT_MV)
    axis.axis("off")
    fig.suptitle(title, fontsize=8, y=0.995)
    fig.savefig(path)
    plt.close(fig)

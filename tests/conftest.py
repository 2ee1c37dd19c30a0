"""Test-wide settings: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported by any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Test-wide settings: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported by any test module.
"""
import contextlib
import glob
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# DeepSpeed's CPU all-reduce op leaves a ~66 MB /dev/shm file per rank and run; the Trainer
# removes its own (melp_scale.train.loop), but tests that kill ranks on purpose or call
# deepspeed.initialize directly leave theirs. At the end of the session, remove the ones this
# session created that no live process maps any more (never one that existed before it).
def shm_buffers() -> set[str]:
    """This user's DeepSpeed all-reduce buffers in /dev/shm."""
    from melp_scale.train.loop import SHM_BUFFER_PREFIX  # imports triton: after TRITON_INTERPRET

    return set(glob.glob(f"{SHM_BUFFER_PREFIX}{os.getuid()}_*"))


def _mapped_paths() -> set[str]:
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as handle:
                mapped.update(line.split(None, 5)[5].strip() for line in handle
                              if "deepspeed_allreduce_buffer" in line)
        except (OSError, IndexError):
            continue
    return mapped


def pytest_sessionstart(session):
    session.config._shm_before = shm_buffers()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_shm_before", None)
    if before is None:
        return
    mapped = _mapped_paths()
    for path in shm_buffers() - before - mapped:
        with contextlib.suppress(OSError):  # best effort: another cleaner may have won
            os.unlink(path)

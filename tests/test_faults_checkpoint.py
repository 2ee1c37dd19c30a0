"""Fault suite, checkpoints (issue 15, classes 1 and 5): nothing we load runs code, a corrupted
checkpoint is refused with the file named, and a kill -9 during a re-save after a resume
leaves the loaded checkpoint intact.

The real DeepSpeed engine runs in one process per step (tests/fault_checkpoint_worker.py);
the refusals are also checked in-process against a stand-in engine that loads the way
DeepSpeed does (``torch.load(weights_only=False)`` through ``engine.checkpoint_engine``).
"""
from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from melp_scale.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "fault_checkpoint_worker.py")


class Payload:
    """Unpickling this creates ``marker``: what an attacker's checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


@pytest.mark.timeout(150)
def test_kill_during_resave_after_resume_keeps_checkpoint_then_payload_refused(tmp_path):
    folder = str(tmp_path / "checkpoints")
    saved = _worker("save", folder, "3")
    assert saved.returncode == 0, saved.stderr[-3000:]
    before = _last_json(saved.stdout)
    died = _worker("resume-and-die", folder)
    assert died.returncode == -signal.SIGKILL, (died.returncode, died.stdout[-2000:], died.stderr[-2000:])
    marker = tmp_path / "marker"
    loaded = _worker("load", folder, str(marker))
    assert loaded.returncode == 0, loaded.stdout[-2000:] + loaded.stderr[-3000:]
    assert _last_json(loaded.stdout) == before  # the step-3 checkpoint, bit for bit
    # then a payload planted in DeepSpeed's model file, with latest.json forged to match it
    assert "mp_rank_00_model_states.pt is not a plain weights file" in loaded.stdout
    assert not marker.exists()


class FakeEngine:
    """Loads every .pt of the tag the way DeepSpeed does: the full unpickler, through
    ``checkpoint_engine.load``; saves two pickles."""

    class _Files:
        def load(self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

    def __init__(self):
        self.checkpoint_engine = self._Files()
        self.loaded = {}

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        torch.save({"module": {"w": torch.arange(4.0)}, **client_state},
                   os.path.join(folder, tag, "mp_rank_00_model_states.pt"))
        torch.save({"optimizer_state_dict": {"step": 1}},
                   os.path.join(folder, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))

    def load_checkpoint(self, folder, tag):
        path = os.path.join(folder, tag)
        for name in sorted(os.listdir(path)):
            if name.endswith(".pt"):
                self.loaded[name] = self.checkpoint_engine.load(os.path.join(path, name))
        return path, {}


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _saved(tmp_path) -> tuple[str, str]:
    folder = str(tmp_path / "checkpoints")
    os.makedirs(folder)
    checkpoint.save(FakeEngine(), folder, 5, {"loader": {"epoch": 1}}, {"model_config": {}}, keep=2)
    return folder, os.path.join(folder, "step-00000005")


@pytest.mark.timeout(60)
def test_checkpoint_state_is_json_and_round_trips(world_of_one, tmp_path):
    folder, tag_dir = _saved(tmp_path)
    names = sorted(os.listdir(tag_dir))
    assert "rank-0.json" in names and "rank-0.safetensors" in names
    assert not [n for n in names if n.startswith("rank-") and n.endswith(".pt")]
    expected = torch.rand(3)  # drawn from the RNG state saved above
    torch.rand(5)
    engine = FakeEngine()
    state = checkpoint.load(engine, folder, "step-00000005")
    assert state == {"loader": {"epoch": 1}}
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(engine.loaded["mp_rank_00_model_states.pt"]["module"]["w"], torch.arange(4.0))
    # saving the step latest.json names again (a resume that stops at once) writes nothing
    before = {n: os.stat(os.path.join(tag_dir, n)).st_mtime_ns for n in names}
    checkpoint.save(FakeEngine(), folder, 5, {"loader": {"epoch": 9}}, {"model_config": {}}, keep=2)
    assert {n: os.stat(os.path.join(tag_dir, n)).st_mtime_ns for n in names} == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["payload_rank_state", "payload_forged_sha", "swapped",
                                   "truncated", "added", "missing", "no_checksums",
                                   "corrupt_latest"])
def test_bad_checkpoint_refused_with_file_named_and_nothing_runs(world_of_one, tmp_path, fault):
    folder, tag_dir = _saved(tmp_path)
    marker = tmp_path / "marker"
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    latest_path = os.path.join(folder, "latest.json")
    latest = json.load(open(latest_path))
    named = model_file
    if fault == "payload_rank_state":  # a pickle where our per-rank state used to be
        named = os.path.join(tag_dir, "rank-0.pt")
        torch.save({"rng": Payload(str(marker))}, named)
        os.remove(os.path.join(tag_dir, "rank-0.json"))
    elif fault in ("payload_forged_sha", "swapped"):
        torch.save({"module": {"w": torch.zeros(4)}, "evil": Payload(str(marker))}, model_file)
        if fault == "payload_forged_sha":
            latest["files"]["mp_rank_00_model_states.pt"] = checkpoint.sha256_file(model_file)
    elif fault == "truncated":
        with open(model_file, "r+b") as handle:
            handle.truncate(100)
    elif fault == "added":
        named = os.path.join(tag_dir, "extra.pt")
        torch.save(Payload(str(marker)), named)
    elif fault == "missing":
        os.remove(model_file)
    elif fault == "no_checksums":
        del latest["files"]
        named = latest_path
    json_text = json.dumps(latest)
    if fault == "corrupt_latest":
        json_text, named = json_text[: len(json_text) // 2], latest_path
    open(latest_path, "w").write(json_text)
    with pytest.raises(ValueError) as error:
        checkpoint.load(FakeEngine(), folder, "step-00000005")
    message = str(error.value)
    assert named in message and "\n" not in message, message
    assert not marker.exists()

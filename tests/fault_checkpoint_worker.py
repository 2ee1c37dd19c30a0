"""A one-process DeepSpeed ZeRO-2 engine on a tiny model, driven by tests/test_faults_checkpoint.py.

    python tests/fault_checkpoint_worker.py save FOLDER STEP
    python tests/fault_checkpoint_worker.py resume-and-die FOLDER     # load, re-save (killed mid-write)
    python tests/fault_checkpoint_worker.py load FOLDER MARKER        # prints {"step", "weights"}

``load`` then plants a payload that would create MARKER in DeepSpeed's model file, forges its
sha256 in latest.json, and loads again (which must be refused: printed as "refused: ...").

``resume-and-die`` loads the latest checkpoint, then saves at the same step and at the next
one with DeepSpeed's file writer replaced by one that writes half a file and SIGKILLs the
process: what a kill -9 in the middle of a save does.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _engine():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine) -> None:
    loss = engine(torch.randn(2, 16)).square().mean()
    engine.backward(loss)
    engine.step()


def _weights(engine) -> list[float]:
    return [round(float(v), 6) for v in engine.module.weight.detach().flatten()[:8]]


def _die_while_writing(state_dict, path, *args, **kwargs) -> None:
    torch.save(state_dict, path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant_payload(folder: str, latest: dict, marker: str) -> None:
    from melp_scale.train import checkpoint

    target = os.path.join(folder, latest["tag"], "mp_rank_00_model_states.pt")
    state = torch.load(target, weights_only=True)
    state["evil"] = _Payload(marker)
    torch.save(state, target)
    latest["files"]["mp_rank_00_model_states.pt"] = checkpoint.sha256_file(target)
    with open(os.path.join(folder, checkpoint.LATEST), "w") as handle:
        json.dump(latest, handle)


def main() -> None:
    from melp_scale.train import checkpoint

    mode, folder = sys.argv[1], sys.argv[2]
    engine = _engine()
    meta = {"model_config": {"model": "tiny"}}
    if mode == "save":
        step = int(sys.argv[3])
        for _ in range(step):
            _step(engine)
        checkpoint.save(engine, folder, step, {"step": step}, meta, keep=2)
        print(json.dumps({"step": step, "weights": _weights(engine)}))
        return
    latest = checkpoint.read_latest(folder)
    try:
        state = checkpoint.load(engine, folder, latest["tag"])
    except ValueError as error:
        print(f"error: {error}")
        sys.exit(2)
    if mode == "load":
        print(json.dumps({"step": state["step"], "weights": _weights(engine)}), flush=True)
        _plant_payload(folder, latest, sys.argv[3])
        try:
            checkpoint.load(engine, folder, latest["tag"])
        except ValueError as error:
            print(f"refused: {error}")
        return
    assert mode == "resume-and-die", mode
    engine.checkpoint_engine.save = _die_while_writing
    step = state["step"]
    checkpoint.save(engine, folder, step, {"step": step}, meta, keep=2)  # the run stops at once
    _step(engine)
    checkpoint.save(engine, folder, step + 1, {"step": step + 1}, meta, keep=2)
    print("not killed")


if __name__ == "__main__":
    main()

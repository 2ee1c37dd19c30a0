"""Fault suite, settings and the launcher (issue 15, classes 8 and 10): every config and ds.json
value is type- and range-checked before step 1 with an error naming it, an unknown override
names the command line, write errors and a taken port are one-line errors with exit 2, and no
test launches on a fixed port."""
from __future__ import annotations

import errno
import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from melp_scale.train import cli
from melp_scale.train.config import load_train_config
from melp_scale.train.engine import load_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("override,named", [
    ("optim.epochs=-1", "optim.epochs"), ("optim.epochs=0", "optim.epochs"),
    ("optim.epochs=2.5", "optim.epochs"), ("optim.max_steps=0", "optim.max_steps"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"), ("optim.seed=-3", "optim.seed"),
    ("run.checkpoint_every=0", "run.checkpoint_every"), ("run.log_every=0", "run.log_every"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"), ("run.max_nonfinite=0", "run.max_nonfinite"),
    ("run.validate=sometimes", "run.validate"), ("data.num_workers=-1", "data.num_workers"),
    ("data.lead_mask_p=1.5", "data.lead_mask_p"), ("data.on_error=ignore", "data.on_error"),
    ("data.normalize=l2", "data.normalize"), ("data.shuffle_window=0", "data.shuffle_window"),
    ("data.worker_timeout=-1", "data.worker_timeout"),
])
def test_bad_config_values_are_refused_naming_the_setting(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.") + " must be"):
        load_train_config("demo", [override])


@pytest.mark.timeout(30)
def test_unknown_override_key_names_the_command_line_not_the_preset():
    with pytest.raises(ValueError) as error:
        load_train_config("demo", ["optim.warmup=3"])
    assert "command-line override(s) ['optim.warmup=3']" in str(error.value)
    assert "demo.yaml" not in str(error.value)
    with pytest.raises(ValueError, match=r"command-line override\(s\) \['optimm.lr=3'\]"):
        load_train_config("demo", ["optimm.lr=3"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key,value,named", [
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
    ("gradient_accumulation_steps", "2", "gradient_accumulation_steps"),
    ("gradient_clipping", "1.0", "gradient_clipping"), ("gradient_clipping", -1, "gradient_clipping"),
    ("train_batch_size", "8", "train_batch_size"),
    ("optimizer.params.betas", [0.9], "optimizer.params.betas"),
    ("optimizer.params.betas", [0.9, 0.95, 0.99], "optimizer.params.betas"),
    ("optimizer.params.betas", [0.9, 1.5], "optimizer.params.betas"),
    ("optimizer.params.lr", -1e-4, "optimizer.params.lr"), ("optimizer.params.lr", "2e-4", "optimizer.params.lr"),
    ("optimizer.params.eps", 0, "optimizer.params.eps"),
    ("optimizer.params.weight_decay", -0.1, "optimizer.params.weight_decay"),
    ("bf16", "yes", "bf16"), ("bf16.enabled", "yes", "bf16.enabled"),
])
def test_bad_ds_json_values_are_refused_naming_the_key(tmp_path, key, value, named):
    with open(os.path.join(REPO, "ds.json")) as handle:
        config = json.load(handle)
    node, parts = config, key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    load_ds_config(os.path.join(REPO, "ds.json"), world_size=1, use_cuda=False)  # as shipped: fine
    with pytest.raises(ValueError, match=named.replace(".", r"\.") + " must be"):
        load_ds_config(str(path), world_size=1, use_cuda=False)


def _launcher():
    spec = importlib.util.spec_from_file_location("pretrain_launcher", os.path.join(REPO, "launch", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_max_steps_zero_and_unwritable_out_are_one_line_errors(tmp_path, capsys):
    launcher = _launcher()
    assert launcher.main(["--max-steps", "0", "--out", str(tmp_path / "run")]) == 2
    assert "optim.max_steps must be >= 1 (--max-steps)" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert launcher.main(["--out", str(blocker / "run"), "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot write") and "a-file" in error and error.count("\n") == 1


@pytest.mark.timeout(60)
def test_disk_full_during_the_run_is_a_one_line_error(tmp_path, capsys):
    args = cli.common_parser("test", "demo", "demo").parse_args(["--out", str(tmp_path / "run")])

    def full_disk(config):
        path = os.path.join(config.run.out, "checkpoints", "latest.json")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    assert cli.run(args, load_train_config, full_disk, cli.common_overrides(args)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "No space left on device" in error and "latest.json" in error


@pytest.mark.timeout(120)
def test_launch_on_a_taken_port_says_so_and_how_to_choose_another(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "launch/pretrain.py", "--out", str(tmp_path / "run"),
                                 "--shards", str(tmp_path / "no-shards"), "--max-steps", "1"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "--master_port" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_no_test_launches_on_a_fixed_port():
    for path in glob.glob(os.path.join(REPO, "tests", "*.py")):
        if os.path.samefile(path, __file__):
            continue
        with open(path) as handle:
            text = handle.read()
        assert "29500" not in text.replace("default 29500", ""), path
        launches = text.count('"--num_gpus"') + text.count('"--nnodes"')
        assert text.count('"--master_port"') >= launches, f"{path}: a launch without --master_port"

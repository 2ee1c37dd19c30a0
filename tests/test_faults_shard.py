"""Fault suite, shard builder (issue 15, classes 2-4 and 8): nothing outside --root is read,
no two records share a sample key, a foreign or busy --out is refused, bad settings and write
errors are one-line errors."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from melp_scale.shard import build as build_module
from melp_scale.shard.__main__ import main
from melp_scale.shard.build import BuildConfig, run_build
from melp_scale.shard.format import iter_shard
from melp_scale.shard.preprocess import SignalConfig
from melp_scale.shard.sources import SourceOptions
from melp_scale.shard.verify import verify
from tests.shard_trees import CANONICAL, ecg_like, mimic_tree, write_wfdb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tripwire:
    """A FIFO that records whether anything opened it for reading.

    A thread waits to open the write end (which returns once a reader opens it), notes the
    open and closes at once, so a reader sees an empty file instead of hanging.
    """

    def __init__(self, path: str):
        self.path = path
        os.mkfifo(path)
        self.opened, self.releasing = threading.Event(), False
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        handle = os.open(self.path, os.O_WRONLY)
        if not self.releasing:
            self.opened.set()
        os.close(handle)

    def was_read(self) -> bool:
        self.releasing = True
        reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # lets the thread finish
        self.thread.join(5)
        os.close(reader)
        return self.opened.is_set()


def _header(folder: str, name: str, signal_file: str, num_samples: int = 5000) -> None:
    """A format-16 12-lead header whose signal file field is ``signal_file`` (any path)."""
    lines = [f"{name} 12 500 {num_samples}"]
    lines += [f"{signal_file} 16 200/mV 16 0 0 0 0 {lead}" for lead in CANONICAL]
    with open(os.path.join(folder, name + ".hea"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def _skips(manifest: dict) -> dict[str, str]:
    return {s["record_id"]: s["reason"] for s in manifest["skipped_records"]}


@pytest.mark.timeout(60)
def test_wfdb_dir_files_outside_root_are_skipped_unread(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(0)
    write_wfdb(str(root), "good", ecg_like(rng, 5000, 500), 500, CANONICAL)
    secret_signal = Tripwire(str(outside / "secret.dat"))
    _header(str(root), "dotdot", "../outside/secret.dat")  # a header pointing out of the root
    secret_absolute = Tripwire(str(outside / "absolute.dat"))
    _header(str(root), "absolute", str(outside / "absolute.dat"))
    secret_header = Tripwire(str(outside / "linked.hea"))
    os.symlink(outside / "linked.hea", root / "linked.hea")  # a header that is a link out
    (root / "data").mkdir()
    linked_dat = Tripwire(str(outside / "viasymlink.dat"))
    os.symlink(outside / "viasymlink.dat", root / "data" / "viasymlink.dat")
    _header(str(root / "data"), "viasymlink", "viasymlink.dat")  # a .dat that is a link out
    manifest = run_build(BuildConfig(source="wfdb-dir", root=str(root), out=str(tmp_path / "s"),
                                     val_fraction=0.0, workers=1))
    opened = {name: wire.was_read() for name, wire in (("dotdot", secret_signal),
              ("absolute", secret_absolute), ("linked", secret_header),
              ("data/viasymlink", linked_dat))}
    assert opened == dict.fromkeys(opened, False)
    assert _skips(manifest) == dict.fromkeys(opened, "outside_root")
    assert manifest["counts"]["kept_records"] == 1


@pytest.mark.timeout(60)
def test_mimic_path_escaping_root_is_skipped_unread(tmp_path):
    root, outside = str(tmp_path / "mimic"), tmp_path / "outside"
    mimic_tree(root)
    outside.mkdir()
    header, signal = Tripwire(str(outside / "rec.hea")), Tripwire(str(outside / "rec.dat"))
    with open(os.path.join(root, "record_list.csv"), "a") as handle:
        handle.write("19000000,49000000,49000000,2180-01-01 00:00:00,../outside/rec\n")
    with open(os.path.join(root, "machine_measurements.csv"), "a") as handle:
        handle.write("19000000,49000000,Sinus rhythm,Normal ECG" + "," * 16 + "\n")
    manifest = run_build(BuildConfig(source="mimic-iv-ecg", root=root, out=str(tmp_path / "s"),
                                     val_fraction=0.0))
    assert not header.was_read() and not signal.was_read()
    assert _skips(manifest)["49000000"] == "outside_root"


def _wfdb_record(folder, name: str, seconds: float = 10.0, seed: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    write_wfdb(str(folder), name, ecg_like(np.random.default_rng(seed), int(500 * seconds), 500),
               500, CANONICAL)


@pytest.mark.timeout(60)
def test_ids_that_sanitise_alike_keep_separate_keys(tmp_path):
    root = tmp_path / "root"
    _wfdb_record(root / "x", "r1", seed=1)  # record id "x/r1"
    _wfdb_record(root, "x-r1", seed=2)  # record id "x-r1": both were key "wfdb-dir_x-r1"
    out = str(tmp_path / "s")
    run_build(BuildConfig(source="wfdb-dir", root=str(root), out=out, val_fraction=0.0))
    keys = {}
    for name in sorted(n for n in os.listdir(out) if n.endswith(".tar")):
        for key, members in iter_shard(os.path.join(out, name)):
            assert key not in keys, key
            keys[key] = members["json"]
    assert len(keys) == 2 and "wfdb-dir_x-r1" in keys  # an id that needs no change keeps its key


@pytest.mark.timeout(60)
def test_window_keys_that_collide_stop_the_build(tmp_path):
    root = tmp_path / "root"
    _wfdb_record(root, "r", seconds=20.0)  # windows r_w0, r_w1 with --all-windows
    _wfdb_record(root, "r_w1", seed=3)
    config = BuildConfig(source="wfdb-dir", root=str(root), out=str(tmp_path / "s"),
                         val_fraction=0.0, signal=SignalConfig(all_windows=True))
    with pytest.raises(ValueError, match="'r_w1'.*window 1 of record 'r'"):
        run_build(config)


@pytest.mark.timeout(60)
def test_duplicate_report_rows_name_both_lines(tmp_path):
    root = tmp_path / "root"
    _wfdb_record(root, "r1")
    reports = tmp_path / "reports.csv"
    reports.write_text("record,report\nr1,sinus rhythm normal ecg\nr2,atrial fibrillation here\n"
                       "r1,left bundle branch block\n")
    config = BuildConfig(source="wfdb-dir", root=str(root), out=str(tmp_path / "s"),
                         options=SourceOptions(reports=str(reports)))
    with pytest.raises(ValueError, match=r"record 'r1' appears twice \(lines 2 and 4\)"):
        run_build(config)
    mimic = str(tmp_path / "mimic")
    mimic_tree(mimic)
    with open(os.path.join(mimic, "machine_measurements.csv")) as handle:
        lines = handle.read().splitlines()
    with open(os.path.join(mimic, "machine_measurements.csv"), "a") as handle:
        handle.write(lines[1].replace("Sinus rhythm", "Atrial fibrillation") + "\n")
    with pytest.raises(ValueError, match=f"study_id {lines[1].split(',')[1]} appears twice "
                                         rf"\(lines 2 and {len(lines) + 1}\)"):
        run_build(BuildConfig(source="mimic-iv-ecg", root=mimic, out=str(tmp_path / "m")))


@pytest.mark.timeout(60)
def test_foreign_out_refused_unless_allowed_and_stale_temporaries_removed(tmp_path, capsys):
    root = tmp_path / "root"
    _wfdb_record(root, "r1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("not ours")
    argv = ["build", "--source", "wfdb-dir", "--root", str(root), "--workers", "1"]
    assert main(argv + ["--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "thesis.docx" in error and "--allow-foreign-out" in error
    assert not (out / "manifest.json").exists() and (out / "thesis.docx").read_text() == "not ours"
    assert main(argv + ["--out", str(out), "--allow-foreign-out"]) == 0
    assert (out / "thesis.docx").read_text() == "not ours"
    # a shard set of ours, with the temporary file of a build that was killed
    mine = tmp_path / "mine"
    assert main(argv + ["--out", str(mine)]) == 0
    (mine / "train-000000.tar.4242.tmp").write_bytes(b"half a shard")
    assert main(argv + ["--out", str(mine)]) == 0
    assert verify(str(mine)) == []


_SLOW_BUILD = """
import sys, time
from melp_scale.shard import build
original = build.build_shard
def slow(*args, **kwargs):
    print("building", flush=True)
    time.sleep(120)
build.build_shard = slow
build.run_build(build.BuildConfig(source="wfdb-dir", root=sys.argv[1], out=sys.argv[2]))
"""


@pytest.mark.timeout(90)
def test_concurrent_build_fails_at_once_and_a_killed_build_leaves_no_lock(tmp_path):
    root, out = tmp_path / "root", str(tmp_path / "out")
    _wfdb_record(root, "r1")
    first = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(root), out], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "building"
        start = time.time()
        with pytest.raises(ValueError, match=f"being written by another build \\(pid {first.pid}"):
            run_build(BuildConfig(source="wfdb-dir", root=str(root), out=out))
        assert time.time() - start < 30  # refused at once, not after waiting for the lock
    finally:
        first.kill()
        first.wait()
    manifest = run_build(BuildConfig(source="wfdb-dir", root=str(root), out=out, val_fraction=0.0))
    assert manifest["counts"]["kept_records"] == 1 and verify(out) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fs", [0, 10, 24, 10_001, 50_000])
def test_sampling_rate_outside_ecg_range_refused(fs, tmp_path, capsys):
    with pytest.raises(ValueError, match="--fs must be between 25 and 10000 Hz"):
        SignalConfig(fs=fs)
    assert main(["build", "--source", "synthetic", "--out", str(tmp_path / "s"),
                 "--fs", str(fs)]) == 2
    assert "--fs must be between" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_write_errors_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    _wfdb_record(root, "r1")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["build", "--source", "wfdb-dir", "--root", str(root), "--workers", "1"]
    assert main(argv + ["--out", str(blocker / "shards")]) == 2  # not a writable folder
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "a-file" in error

    def full_disk(path, samples):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")

    monkeypatch.setattr(build_module, "write_shard", full_disk)
    assert main(argv + ["--out", str(tmp_path / "full")]) == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in error
    assert "No space left on device" in lines[0] and "train-000000.tar" in lines[0]

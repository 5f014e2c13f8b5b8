"""Untrusted files, signals to sweeps and launchers, one live run per folder, and faults that
must end in one clear line with nothing already written lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from test_resilience import files

QUICK = ["trainer.progress=false", "logger.histogram_every=0"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


class Payload:
    """Unpickling this creates ``marker``: what a crafted file would do with a full unpickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def error_lines(stderr: str):
    return [ln for ln in stderr.splitlines() if ln.strip()]


def spawn(args, cwd, **kw):
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    return subprocess.Popen([sys.executable, "-m", "regexp.run", *flags, *QUICK, *rest], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, timeout=120.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def metrics(folder: Path):
    return json.loads((folder / "metrics.json").read_text())


# ---------------------------------------------------------------- untrusted files
def test_crafted_checkpoint_is_refused_on_resume_and_sweep_relaunch(cli, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": {}, "model": Payload(marker)}, run / "checkpoint.pt")
    proc = cli(["trainer.epochs=1", "trainer.resume=true", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2 and not marker.exists()
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {run / 'checkpoint.pt'}: refused to load this checkpoint") and "GLOBAL" in line

    # a -m sweep resumes its jobs by itself: the crafted file in a job's folder is refused too
    sweep = tmp_path / "sweep"
    job = sweep / "model.width=8,trainer.epochs=1"
    job.mkdir(parents=True)
    torch.save({"model": Payload(marker)}, job / "checkpoint.pt")
    proc = cli(["-m", "model.width=8,16", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"], check=False)
    assert proc.returncode == 1 and not marker.exists()
    assert "sweep: 2 jobs (1 completed, 1 failed)" in proc.stdout
    assert "refused to load this checkpoint" in metrics(job)["error"]

    # and so does an in-process sweep, serial or population
    for engine in ("serial", "population"):
        out = tmp_path / engine
        point = out / "model.width=8,seed=0"
        point.mkdir(parents=True)
        torch.save({"model": Payload(marker)}, point / "checkpoint.pt")
        proc = cli(["task=sweep", "++sweep.params={model.width:[8]}", f"sweep.engine={engine}", "trainer.epochs=1",
                    f"hydra.run.dir={out}"], check=False)
        assert not marker.exists()
        assert "refused to load this checkpoint" in metrics(point)["error"], engine


def test_crafted_transfer_model_is_refused(cli, tmp_path):
    marker = tmp_path / "pwned"
    source = tmp_path / "source"
    source.mkdir()
    torch.save({"net.0.weight": Payload(marker)}, source / "model.pt")
    proc = cli(["regularizer=[transfer]", f"regularizer.transfer.run_dir={source}", "trainer.epochs=1",
                f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and not marker.exists()
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {source / 'model.pt'}: refused to load this model file")


def test_checkpoints_hold_only_what_the_weights_only_loader_admits(cli, tmp_path):
    """RNG states, configs and histories are stored as tensors and plain containers."""
    run = tmp_path / "run"
    cli(["trainer.epochs=1", "regularizer=[dropout,soft_weight_sharing,early_stopping]", f"hydra.run.dir={run}"])
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert isinstance(ck["rng"]["numpy"]["keys"], torch.Tensor) and ck["config"]["trainer"]["epochs"] == 1


# ---------------------------------------------------------------- a stopped sweep stops
SWEEP = ["task=sweep", "++sweep.params={model.width:[8,12,16]}", "data.n_train=1800", "trainer.batch_size=10",
         "trainer.deterministic=true"]


# Enough epochs that the signal (0.5 s in) lands while the first point (serial) or the
# population trains.
@pytest.mark.parametrize("engine, epochs", [("serial", 60), ("population", 60)])
def test_sigterm_stops_an_in_process_sweep_and_a_relaunch_finishes_it_exactly(tmp_path, engine, epochs):
    args = [*SWEEP, f"trainer.epochs={epochs}", f"sweep.engine={engine}"]
    ref = tmp_path / "ref"
    run_cli([*args, f"hydra.run.dir={ref}"], tmp_path)

    out = tmp_path / "sweep"
    proc = spawn([*args, f"hydra.run.dir={out}"], tmp_path)
    first = out / "model.width=8,seed=0"
    wait_for(lambda: any(first.glob("events.out.tfevents.*")))
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    state = metrics(out)
    assert state["status"] == "interrupted" and state["signal"] == signal.SIGTERM
    statuses = {d.name: metrics(d)["status"] for d in out.iterdir() if (d / "metrics.json").exists() and d != out}
    assert "interrupted" in statuses.values()
    if engine == "serial":  # nothing after the interrupted point was started
        assert statuses == {first.name: "interrupted"}
        assert not (out / "model.width=12,seed=0").exists()

    again = run_cli([*args, f"hydra.run.dir={out}"], tmp_path)
    assert "status=completed" in again.stdout
    assert metrics(out)["status"] == "completed"
    for d in ref.iterdir():
        if (d / "metrics.json").exists() and d.is_dir():
            done, expect = metrics(out / d.name), metrics(d)
            assert done["status"] == "completed"
            assert done["history"] == expect["history"], d.name


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (bit 15 of SigCgt)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_sigterm_during_start_up_is_recorded(tmp_path):
    run = tmp_path / "run"
    proc = spawn(["trainer.epochs=3", f"hydra.run.dir={run}"], tmp_path)
    # as soon as the handler is in place: long before Hydra, torch and the data are loaded
    wait_for(lambda: _catches_sigterm(proc.pid) or proc.poll() is not None, timeout=30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = metrics(run)
    assert m["status"] == "interrupted" and m["signal"] == signal.SIGTERM and m["epochs"] == 0
    assert not (run / "checkpoint.pt").exists()  # no step was taken: nothing to resume from
    done = run_cli(["trainer.epochs=3", f"hydra.run.dir={run}"], tmp_path)  # starts afresh
    assert metrics(run)["status"] == "completed" and "status=completed" in done.stdout


def _descendants(pid: int):
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for c in task.read_text().split():
            out += [int(c), *_descendants(int(c))]
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_sigterm_to_a_parallel_launcher_stops_its_workers(tmp_path):
    sweep = tmp_path / "sweep"
    proc = spawn(["-m", "hydra/launcher=local_parallel", "model.width=8,16,24,32", "trainer.epochs=500",
                  f"hydra.sweep.dir={sweep}"], tmp_path)
    wait_for(lambda: len(list(sweep.glob("*/events.out.tfevents.*"))) >= 2)
    workers = [p for p in _descendants(proc.pid) if "regexp" in Path(f"/proc/{p}/cmdline").read_text()
               or "loky" in Path(f"/proc/{p}/cmdline").read_text()]
    assert workers
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), timeout=30)
    statuses = [metrics(d)["status"] for d in sweep.iterdir() if (d / "metrics.json").exists()]
    assert statuses == ["interrupted"] * 4  # 500 epochs would take minutes: none ran on
    assert "sweep: 4 jobs (4 interrupted)" in out


# ---------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_live_folder_is_refused(cli, tmp_path):
    run = tmp_path / "run"
    # long enough to outlast the second run's start-up also as a population of one (a lone
    # run's default engine), which trains this several times faster than the trainer's loop
    first = spawn(["trainer.epochs=150", "data.n_train=1800", "trainer.batch_size=10", f"hydra.run.dir={run}"],
                  tmp_path)
    wait_for(lambda: any(run.glob("events.out.tfevents.*")))
    before = (run / ".hydra" / "config.yaml").read_text()
    second = cli(["trainer.epochs=2", "model.width=7", f"hydra.run.dir={run}"], check=False)
    assert second.returncode == 2
    [line] = error_lines(second.stderr)
    assert line == f"error: {run} is in use by another run (pid {first.pid}); wait for it to finish, " \
                   "or choose another hydra.run.dir"
    assert (run / ".hydra" / "config.yaml").read_text() == before
    first.communicate(timeout=300)
    assert first.returncode == 0
    m = metrics(run)
    assert m["status"] == "completed" and m["epochs"] == 150 and m["config"]["model"]["width"] == 100
    assert "width: 7" not in (run / ".hydra" / "config.yaml").read_text()


def test_a_stale_lock_is_taken_over(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999\n")  # a holder that died: no flock is held
    cli(["trainer.epochs=1", f"hydra.run.dir={run}"])
    assert metrics(run)["status"] == "completed"
    assert (run / ".lock").read_text().strip() != "999999999"


def test_refused_runs_leave_the_folder_as_it_was(cli, tmp_path):
    run = tmp_path / "run"
    cli(["trainer.epochs=2", "trainer.checkpoint_every=1", f"hydra.run.dir={run}"])
    # a finished run with another config, even with trainer.resume=true
    before = files(run)
    proc = cli(["trainer.epochs=2", "trainer.checkpoint_every=1", "model.width=50", "trainer.resume=true",
                f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2 and "was written with another config (model.width differ)" in proc.stderr
    assert files(run) == before
    # the same config resumes (skips) a finished run, even on another device and data folder
    proc = cli(["trainer.epochs=2", "trainer.checkpoint_every=1", "trainer.resume=true", "trainer.device=cpu",
                f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run}"])
    assert "skipped" in proc.stdout

    # an unfinished run: another config, then a corrupt checkpoint
    (run / "metrics.json").unlink()
    before = files(run)
    proc = cli(["trainer.epochs=2", "model.width=50", "trainer.resume=true", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2 and files(run) == before
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:500])
    before = files(run)
    proc = cli(["trainer.epochs=2", "trainer.checkpoint_every=1", "trainer.resume=true", f"hydra.run.dir={run}"],
               check=False)
    assert proc.returncode == 2 and "corrupt or truncated checkpoint" in proc.stderr
    assert files(run) == before


def test_resume_may_change_device_and_data_root(cli, tmp_path):
    import shutil

    data = tmp_path / "data"
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ["trainer.epochs=3", "data.n_train=1800", "trainer.batch_size=10", "trainer.checkpoint_every=1",
              "trainer.deterministic=true"]
    cli([*common, f"data.root={data}", f"hydra.run.dir={ref}"])
    proc = spawn([*common, f"data.root={data}", f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: (run / "checkpoint.pt").exists())
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143 and metrics(run)["status"] == "interrupted"
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    done = cli([*common, "trainer.resume=true", "trainer.device=cpu", f"data.root={moved}", f"hydra.run.dir={run}"])
    assert "status=completed" in done.stdout
    assert metrics(run)["history"] == metrics(ref)["history"]


@pytest.mark.parametrize("value, message", [
    ("", "hydra.run.dir='' is invalid: expected a folder path"),
    ("afile", "hydra.run.dir=afile is invalid: it names a file; expected a folder"),
    ("afile/sub", "hydra.run.dir=afile/sub is invalid: it lies below the file afile; expected a folder"),
])
def test_bad_run_dir_is_refused(cli, tmp_path, value, message):
    (tmp_path / "afile").write_text("keep me")
    proc = cli(["trainer.epochs=1", f"hydra.run.dir={value}"], check=False)
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "keep me"


def test_sweep_summary_counts_only_this_launch(cli, tmp_path):
    sweep = tmp_path / "sweep"
    first = cli(["-m", "model.width=4,5,6,7", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"])
    assert "sweep: 4 jobs (4 completed)" in first.stdout
    again = cli(["-m", "model.width=4,5", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"])
    assert "sweep: 2 jobs (2 completed)" in again.stdout


# ---------------------------------------------------------------- faults: one line, nothing lost
def _in_process(tmp_path, patch: str, args):
    """The CLI with ``patch`` applied first (a fault no config can produce)."""
    script = textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        sys.argv = ["regexp.run", *{[*QUICK, *args]!r}]
        from regexp.run import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    patch = """
        import errno
        import regexp.train.io as io
        saves = []
        real = io._torch_save
        def full_after_first(obj, p):
            if "checkpoint.pt" in p.name:  # init_model.pt is written first and goes through
                saves.append(p)
            if len(saves) > 1:  # the epoch-2 checkpoint: part of it written, then the disk is full
                p.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            real(obj, p)
        io._torch_save = full_after_first
    """
    proc = _in_process(tmp_path, patch, ["trainer.epochs=4", "trainer.checkpoint_every=1", f"hydra.run.dir={run}"])
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [f"error: no space left on device while writing {run / 'checkpoint.pt'}"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the previous one, intact
    m = metrics(run)
    assert m["status"] == "failed" and m["error"].startswith("no space left on device")
    assert not list(run.glob(".checkpoint.pt.tmp*"))


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "450k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        proc = run_cli(["trainer.epochs=4", "trainer.checkpoint_every=1", f"hydra.run.dir={run}", *QUICK],
                       tmp_path, check=False)
        assert proc.returncode == 1
        assert error_lines(proc.stderr) == [f"error: no space left on device while writing {run / 'checkpoint.pt'}"]
        assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
        assert metrics(run)["status"] == "failed"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_unexpected_exception_is_one_line_with_the_traceback_in_run_log(tmp_path):
    run = tmp_path / "run"
    patch = """
        import regexp.models as models
        def broken(*a, **k):
            raise RuntimeError("boom")
        models.build_model = broken
        import regexp.train.trainer as trainer
        trainer.build_model = broken
    """
    proc = _in_process(tmp_path, patch, ["trainer.epochs=1", f"hydra.run.dir={run}"])
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [f"error: RuntimeError: boom (traceback in {run / 'run.log'})"]
    assert "Traceback" not in proc.stdout
    log = (run / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom" in log
    assert metrics(run)["status"] == "failed"


def test_a_point_with_many_overrides_gets_a_folder_name_the_file_system_accepts(tmp_path):
    """Names past 255 bytes fail to be created: a long point keeps its head and a digest of the
    whole, so two long points sharing the head still get their own folders."""
    from regexp.sweep import NAME_BYTES, point_name

    short = {"model.width": 8, "seed": 0}
    assert point_name(short) == "model.width=8,seed=0"
    keys = [f"regularizer.soft_weight_sharing.{k}" for k in ("tau", "lr", "init_sigma", "pi0", "gamma_beta", "gamma_alpha")]
    a = {**short, **{k: 0.5 for k in keys}}
    b = {**short, **{k: 0.5 for k in keys[:-1]}, keys[-1]: 2.0}
    na, nb = point_name(a), point_name(b)
    assert len(",".join(f"{k}={v}" for k, v in a.items()).encode()) > 255
    assert len(na.encode()) <= NAME_BYTES and na != nb and na.split("~")[0] == nb.split("~")[0]
    assert na == point_name(dict(a))  # the same point, the same folder (a resumed sweep finds it)
    (tmp_path / na).mkdir()
    (tmp_path / nb).mkdir()

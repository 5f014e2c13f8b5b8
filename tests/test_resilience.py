"""Interruption, resume, divergence, atomic writes and refusing to clobber finished runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, StopAfter, read_scalars

# Long enough epochs (360 steps) that a signal lands mid-epoch; dropout makes the global RNG matter.
RUN = ["trainer.epochs=4", "data.n_train=1800", "trainer.batch_size=5", "model.width=64",
       "regularizer=[dropout]", "regularizer.dropout.p=0.2", "optimizer.lr=0.003", "trainer.checkpoint_every=1",
       "trainer.deterministic=true", "trainer.progress=false", "logger.histogram_every=0"]


def files(folder):
    """Every file below ``folder`` (.hydra/ included) and its bytes, but the lock's holder pid."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(cli, tmp_path):
    # timed by the wall clock to land in epoch 2: one example per step, 1800 steps (~0.4 s) an epoch
    run_args = [*RUN, "trainer.epochs=3", "trainer.batch_size=1"]
    ref = tmp_path / "ref"
    cli([*run_args, f"hydra.run.dir={ref}"])

    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "regexp.run", *run_args, f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["signal"] == signal.SIGTERM
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] < 3 and 0 < ck["step_in_epoch"] < 1800, "the signal should land mid-epoch"

    cli([*run_args, "trainer.resume=true", f"hydra.run.dir={run}"])
    done, expect = (json.loads((d / "metrics.json").read_text()) for d in (run, ref))
    assert done["status"] == "completed"
    assert done["history"] == expect["history"] and done["final"] == expect["final"]
    assert done["best"] == expect["best"]
    _same_state(torch.load(run / "model.pt", weights_only=True), torch.load(ref / "model.pt", weights_only=True))
    # TensorBoard shows each epoch once across the interrupted and the resumed event files
    assert [s for s, _ in read_scalars(run)["acc/test"]] == [1, 2, 3]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    import errno

    from regexp.train import io

    path = tmp_path / "checkpoint.pt"
    io.save_torch(path, {"epoch": 1})
    before = path.read_bytes()

    def full_disk_save(obj, f):  # as a full disk does: part of the file written, then ENOSPC
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(io.WriteFailed, match=f"^no space left on device while writing {path}$"):
        io.save_torch(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_divergence_is_recorded(cli, tmp_path):
    run = tmp_path / "nan"
    proc = cli(["optimizer=sgd", "optimizer.lr=1e20", "trainer.epochs=5", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 3
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["diverged_epoch"] == 1 and m["epochs"] == 1
    assert read_scalars(run)["diverged"] == [(1, 1.0)]


def test_sweep_with_one_diverging_job_and_relaunch(cli, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "optimizer=sgd", "optimizer.lr=0.01,1e20,0.05", "trainer.epochs=2", f"hydra.sweep.dir={sweep}"]
    proc = cli(args)
    assert "sweep: 3 jobs (2 completed, 1 diverged)" in proc.stdout
    status = {d.name: json.loads((d / "metrics.json").read_text())["status"] for d in sweep.iterdir() if d.is_dir()}
    assert sorted(status.values()) == ["completed", "completed", "diverged"]
    stamps = {d: (d / "metrics.json").stat().st_mtime_ns for d in sweep.iterdir() if d.is_dir()}
    again = cli(args)  # re-launching the finished sweep trains nothing
    assert again.stdout.count("skipped") == 3
    assert "sweep: 3 jobs (2 completed, 1 diverged)" in again.stdout
    for d, t in stamps.items():
        assert (d / "metrics.json").stat().st_mtime_ns == t


def test_failed_job_does_not_stop_the_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "model.width=8,0,16", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"], check=False)
    assert proc.returncode == 1
    assert "sweep: 3 jobs (2 completed, 1 failed)" in proc.stdout
    bad = json.loads((sweep / "model.width=0,trainer.epochs=1" / "metrics.json").read_text())
    assert bad["status"] == "failed" and "model.width=0 is invalid" in bad["error"]


def test_completed_run_dir_is_not_overwritten(cli, tmp_path):
    run = tmp_path / "done"
    cli(["trainer.epochs=1", f"hydra.run.dir={run}"])
    before = files(run)
    proc = cli(["trainer.epochs=1", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2
    assert "already holds a completed run; pass trainer.resume=true" in proc.stderr
    assert files(run) == before
    cli(["trainer.epochs=1", "trainer.overwrite=true", f"hydra.run.dir={run}"])


def test_corrupt_and_incompatible_checkpoints(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli(["trainer.epochs=2", "trainer.checkpoint_every=1", f"hydra.run.dir={run}"])
    (run / "metrics.json").unlink()  # pretend it stopped after the checkpoint
    proc = cli(["trainer.epochs=2", "model.width=50", "trainer.resume=true", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2 and "was written with another config (model.width differ)" in proc.stderr
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:500])
    proc = cli(["trainer.epochs=2", "trainer.resume=true", f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == 2 and "checkpoint.pt: corrupt or truncated checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deterministic_runs_are_identical(cli, tmp_path):
    for name in ("a", "b"):
        cli(["trainer.epochs=2", "trainer.deterministic=true", "regularizer=[dropout]", f"hydra.run.dir={tmp_path / name}"])
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert a["history"] == b["history"]
    _same_state(torch.load(tmp_path / "a" / "model.pt", weights_only=True), torch.load(tmp_path / "b" / "model.pt", weights_only=True))


@pytest.mark.parametrize("regs", [
    ["regularizer=[ensemble,dropout,weight_noise,early_stopping]", "regularizer.ensemble.components=2",
     "regularizer.ensemble.bootstrap=true"],
    ["regularizer=[soft_weight_sharing,dropout,weight_noise,early_stopping]",
     "regularizer.soft_weight_sharing.tau=0.005"],
    # FGSM against the ensemble's prediction and the batch penalties on it, their extra passes' dropout draws
    ["regularizer=[ensemble,adversarial,tangent_prop,gradient_norm_penalty,dropout,early_stopping]",
     "regularizer.ensemble.components=2", "regularizer.gradient_norm_penalty.mode=sgd"],
    # the one mixture over both models and its optimizer state, which each slice's copy reads back
    ["regularizer=[ensemble,soft_weight_sharing,dropout,early_stopping]", "regularizer.ensemble.components=2",
     "regularizer.soft_weight_sharing.tau=0.5", "regularizer.soft_weight_sharing.gamma_alpha=2.0",
     "regularizer.soft_weight_sharing.gamma_beta=0.1"],
    # SAM's ascent over both models and the one mixture, from the restored mixture state
    ["regularizer=[ensemble,soft_weight_sharing,dropout,early_stopping]", "regularizer.ensemble.components=2",
     "regularizer.soft_weight_sharing.tau=0.5", "optimizer=sam", "optimizer.base=adam", "optimizer.lr=0.003"],
], ids=["ensemble", "soft-weight-sharing", "ensemble-joint-terms", "ensemble-soft-weight-sharing",
        "ensemble-soft-weight-sharing-sam"])
def test_resume_restores_regularizer_state(compose_cfg, tmp_path, monkeypatch, regs):
    """The soft-weight-sharing mixture, its optimizer group, early-stopping counters, the
    ensemble members and the RNG behind dropout and noise all come back from the checkpoint."""
    import regexp.population.engine as engine
    import regexp.train.trainer as trainer

    overrides = regs + ["regularizer.early_stopping.patience=50", "data.n_train=600", "model.width=16",
                        "trainer.epochs=3", "trainer.progress=false", "logger.histogram_every=0"]
    cfg = compose_cfg(overrides)
    ref = trainer.train(cfg, tmp_path / "ref")
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(8))  # mid-epoch 2 (6 steps and one check per epoch)
    stopped = trainer.train(cfg, tmp_path / "run")
    assert stopped["status"] == "interrupted" and stopped["epochs"] == 1
    monkeypatch.undo()
    resumed = trainer.train(compose_cfg(overrides + ["trainer.resume=true"]), tmp_path / "run")
    assert resumed["history"] == ref["history"] and resumed["extra"] == ref["extra"]
    _same_state(torch.load(tmp_path / "run" / "model.pt", weights_only=True),
                torch.load(tmp_path / "ref" / "model.pt", weights_only=True))
    a = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["regularizers"]
    b = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["regularizers"]
    assert repr(a) == repr(b)

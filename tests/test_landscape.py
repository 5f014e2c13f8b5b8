"""``python -m regexp.landscape``: the filter-normalised directions against Li et al.'s
definition, the lines' and slices' ends against losses computed directly, the refusals, and
that nothing outside ``landscape/`` changes."""
from __future__ import annotations

import csv
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import StopAfter
from regexp import landscape as ls
from regexp.probes.runner import probe_batch
from regexp.population import engine as population_engine
from regexp.train.trainer import train

TINY = ["trainer.epochs=2", "trainer.progress=false", "trainer.threads=1", "data.n_train=200",
        "model.width=16", "logger.histogram_every=0", "probe.batch_size=64"]
FAST = ["--points", "5", "--grid", "5"]


@pytest.fixture(scope="module")
def runs(compose_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("a", []), ("b", ["seed=1"]), ("wide", ["model.width=24"])):
        train(compose_cfg(TINY + extra), root / name)
    return root


def fresh(runs, tmp_path, name="a"):
    """A copy of a run folder, so that each test sees it without another test's landscape/."""
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def rows(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def direct_loss(run_dir, state):
    """The probe batch's mean cross-entropy at ``state``, computed here from the model alone."""
    config, _ = ls.load_run(run_dir)
    cfg, data, model = ls.build(config, run_dir, torch.device("cpu"))
    model.load_state_dict(state)
    x, y = probe_batch(*data.split("train"), int(cfg.seed), int(cfg.probe.batch_size))
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y).item()


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "landscape" not in p.relative_to(folder).parts}


def test_filter_normalised_direction_matches_its_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(4 * 6, 5))
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    theta["0.weight"][2] = 0.0  # a filter at 0 stays at 0 in the direction
    theta["1.running_mean"] += 1.0
    model.load_state_dict(theta)
    d = ls.filter_normalized_direction(model, theta, torch.Generator().manual_seed(1))
    assert list(d) == list(theta)
    for k in ("0.weight", "3.weight"):  # each output channel / output row: ‖d_i‖ = ‖θ_i‖
        for i in range(theta[k].shape[0]):
            assert d[k][i].norm().item() == pytest.approx(theta[k][i].norm().item(), rel=1e-5, abs=1e-9)
        # a random direction, not θ rescaled
        assert abs(F.cosine_similarity(d[k].flatten(), theta[k].flatten(), dim=0)) < 0.9
    assert d["0.weight"][2].abs().max() == 0
    for k in ("0.bias", "1.weight", "1.bias", "3.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.count_nonzero(d[k]) == 0, k  # biases, norm layers and buffers: 0


def test_init_model_saved_equals_rebuilt_and_kept_on_resume(runs, compose_cfg, tmp_path, monkeypatch):
    run = runs / "a"
    saved = torch.load(run / "init_model.pt", weights_only=True)
    config, final = ls.load_run(run)
    _, _, model = ls.build(config, run, torch.device("cpu"))
    rebuilt = model.state_dict()
    assert list(saved) == list(rebuilt) == list(final)
    assert all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    assert not all(torch.equal(saved[k], final[k]) for k in saved)  # training moved the weights
    # a resumed run keeps the file it finds (here a marker): the construction is the same
    monkeypatch.setattr(population_engine, "StopFlag", lambda: StopAfter(2))
    assert train(compose_cfg(TINY), tmp_path / "r")["status"] == "interrupted"
    monkeypatch.undo()
    marker = {k: torch.zeros_like(v) for k, v in saved.items()}
    torch.save(marker, tmp_path / "r" / "init_model.pt")
    before = (tmp_path / "r" / "init_model.pt").read_bytes()
    assert train(compose_cfg(TINY + ["trainer.resume=true"]), tmp_path / "r")["status"] == "completed"
    assert (tmp_path / "r" / "init_model.pt").read_bytes() == before


def test_line_and_slices_end_at_the_losses_of_their_weights(runs, tmp_path):
    run = fresh(runs, tmp_path)
    other = runs / "b"
    summary = ls.landscape(ls.parse_args([str(run), "--2d", "--other", str(other), *FAST]))
    assert summary["init"] == "init_model.pt"
    out = run / "landscape"
    init = torch.load(run / "init_model.pt", weights_only=True)
    final = torch.load(run / "model.pt", weights_only=True)
    at = lambda rs, a: next(r for r in rs if r["alpha"] == a)  # noqa: E731
    line = rows(out / "line.csv")
    assert [r["alpha"] for r in line] == [-0.25, 0.0, 0.125, 0.5, 0.875, 1.0, 1.25]  # 0 and 1 added
    assert at(line, 0.0)["train_loss"] == pytest.approx(direct_loss(run, init), rel=1e-5)
    assert at(line, 1.0)["train_loss"] == pytest.approx(direct_loss(run, final), rel=1e-5)
    between = rows(out / "between.csv")
    assert at(between, 0.0)["train_loss"] == pytest.approx(direct_loss(run, final), rel=1e-5)
    b_final = torch.load(other / "model.pt", weights_only=True)
    assert at(between, 1.0)["train_loss"] == pytest.approx(direct_loss(run, b_final), rel=1e-5)
    s1 = rows(out / "slice_1d.csv")
    assert [r["alpha"] for r in s1] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert at(s1, 0.0)["train_loss"] == pytest.approx(direct_loss(run, final), rel=1e-5)
    assert len({r["train_loss"] for r in s1}) == 5  # the direction moves the loss
    s2 = rows(out / "slice_2d.csv")
    assert [(r["alpha"], r["beta"]) for r in s2] == [(a, b) for a in (-1, -.5, 0, .5, 1) for b in (-1, -.5, 0, .5, 1)]
    centre = next(r for r in s2 if r["alpha"] == 0 and r["beta"] == 0)
    assert centre["train_loss"] == pytest.approx(direct_loss(run, final), rel=1e-5)
    # the 2-D slice's first direction is the 1-D slice's: its β = 0 column is the 1-D slice
    assert [r["train_loss"] for r in s2 if r["beta"] == 0] == pytest.approx([r["train_loss"] for r in s1])
    assert summary["slice_2d"]["min_loss"] == min(r["train_loss"] for r in s2)
    # figures, and the same bytes as TensorBoard images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out))
    acc.Reload()
    names = ["between", "line", "slice_1d", "slice_2d"]
    assert sorted(acc.Tags()["images"]) == [f"landscape/{n}" for n in names]
    for n in names:
        assert acc.Images(f"landscape/{n}")[0].encoded_image_string == (out / f"{n}.png").read_bytes()


def test_old_folder_without_init_model_gets_the_same_line(runs, tmp_path):
    run = fresh(runs, tmp_path)
    ls.landscape(ls.parse_args([str(run), *FAST]))
    with_file = (run / "landscape" / "line.csv").read_text()
    (run / "init_model.pt").unlink()
    assert ls.landscape(ls.parse_args([str(run), *FAST]))["init"] == "rebuilt from config and seed"
    assert (run / "landscape" / "line.csv").read_text() == with_file


def test_nothing_outside_landscape_changes_and_a_rerun_replaces_its_own(runs, tmp_path):
    run = fresh(runs, tmp_path)
    before = files(run)
    for _ in range(2):
        assert ls.main([str(run), "--2d", "--test", *FAST]) == 0
    assert files(run) == before
    assert len(list((run / "landscape").glob("events.out.tfevents.*"))) == 1
    assert "test_loss" in rows(run / "landscape" / "line.csv")[0]


def test_refusals_are_one_line(runs, tmp_path, capsys):
    run = fresh(runs, tmp_path)
    assert ls.main([str(run), "--other", str(runs / "wide"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(runs / "wide") in err and str(run) in err and "architecture" in err
    assert not (run / "landscape").exists()  # refused before anything was written
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "metrics.json", empty)
    assert ls.main([str(empty)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {empty}: no model.pt (a finished run folder holds "
                                               "metrics.json and model.pt)")
    assert sorted(p.name for p in empty.iterdir()) == ["metrics.json"]
    assert ls.main([str(run), "--range", "1", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --range 1 -1 is invalid: expected two finite numbers A < B"

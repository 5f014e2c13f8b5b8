"""Joint parameter tying (``parameter_tying.mode=joint``: a partner model trained beside the
run's, loss CE_A + CE_B + λ‖w_A − w_B‖²) in the population engine (regexp/population/partner.py):
a population of one against a plain torch reference, against the trainer's loop, a population
of three joint runs against each of them alone, and an interrupted joint population resuming
to the uninterrupted one.

Stated tolerances (float32; only summation orders inside the batched products differ): after
the runs here (up to 300 steps), every parameter of A and of its partner within
|a − b| <= 1e-5 + 1e-4·|b|, every metric within a relative 1e-4 (TensorBoard's logged values,
float32 sums over the epoch, within 1e-3), as tests/test_population.py states them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import StopAfter, read_scalars
from regexp.population import train_population, use_population
from regexp.sweep import point_config, point_name
from regexp.train.trainer import train

ATOL, RTOL = 1e-5, 1e-4
KEY = "regularizer.parameter_tying"
QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]
# the partner's task: four times A's examples, 30% of its labels randomized, batches of 30
# (400 = 13 x 30 + 10: its epochs end elsewhere than A's, on a short batch)
PARTNER = [f"+{KEY}.partner_data.n_train=400", f"+{KEY}.partner_data.label_noise=0.3"]
JOINT = ["regularizer=[parameter_tying]", f"{KEY}.mode=joint", *PARTNER, "data.n_train=100", "trainer.batch_size=50",
         *QUICK]
FILES = ("model.pt", "partner_model.pt")


def _load(path: Path):
    return torch.load(path, weights_only=True)


def _close_weights(a_dir: Path, b_dir: Path) -> None:
    for f in FILES:
        a, b = _load(a_dir / f), _load(b_dir / f)
        assert a.keys() == b.keys(), f
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=f"{f} {k}")


def _same_run(a_dir: Path, b_dir: Path, a, b) -> None:
    """Two runs of one joint config: weights of both models, metrics, extra, logs, checkpoint."""
    _close_weights(a_dir, b_dir)
    assert a["status"] == b["status"] == "completed" and a["epochs"] == b["epochs"]
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=RTOL, abs=1e-6), k
    assert a["extra"].keys() == b["extra"].keys()
    for k in a["extra"]:
        assert a["extra"][k] == pytest.approx(b["extra"][k], rel=RTOL, abs=1e-6), k
    sa, sb = read_scalars(a_dir), read_scalars(b_dir)
    assert set(sa) == set(sb)
    assert {"penalty/parameter_tying", "parameter_tying/partner_train_running_loss",
            "parameter_tying/distance_to_partner"} <= set(sa)
    for tag in sb:
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        assert [v for _, v in sa[tag]] == pytest.approx([v for _, v in sb[tag]], rel=1e-3, abs=1e-6), tag
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a_dir, b_dir))
    assert ca.keys() == cb.keys()
    ra, rb = (next(r for r in c["regularizers"] if "partner" in r) for c in (ca, cb))  # the partner's own state
    assert ra.keys() == rb.keys() and ra["step"] == rb["step"] and torch.equal(ra["perm"], rb["perm"])
    assert torch.equal(ra["order"], rb["order"])
    for k in rb["partner"]:
        torch.testing.assert_close(ra["partner"][k], rb["partner"][k], atol=ATOL, rtol=RTOL)
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()  # the partner's group too
    for i, st in cb["optimizer"]["state"].items():
        for k, v in st.items():
            if v is not None:
                torch.testing.assert_close(ca["optimizer"]["state"][i][k], v, atol=ATOL, rtol=1e-3)


# ---------------------------------------------------------------- a population of one
def test_population_of_one_equals_a_plain_torch_reference(compose_cfg, tmp_path):
    """300 steps (30 epochs of 10 batches of 10) of two one-hidden-layer MLPs, A seeded 3 and
    its partner 11, SGD with momentum 0.9 over both, written here with torch.nn and torch.optim."""
    from regexp.data import load_data

    seed, partner_seed, lam, lr, width = 3, 11, 0.4, 0.05, 12
    cfg = compose_cfg(["regularizer=[parameter_tying]", f"{KEY}.mode=joint", *PARTNER, f"{KEY}.lam={lam}",
                       f"{KEY}.partner_seed={partner_seed}", f"{KEY}.partner_batch_size=30", f"seed={seed}",
                       "model.depth=1", f"model.width={width}", "optimizer=momentum", f"optimizer.lr={lr}",
                       "data.n_train=100", "trainer.batch_size=10", "trainer.epochs=30", "trainer.eval_every=30", *QUICK])
    run = train(cfg, tmp_path / "run")
    assert run["engine"] == "population"

    data_a = load_data(cfg.data, seed)
    data_b = load_data(OmegaConf.merge(cfg.data, {"n_train": 400, "label_noise": 0.3}), seed)
    (xa, ya), (xb, yb) = data_a.split("train"), data_b.split("train")
    d, c = xa[0].numel(), data_a.num_classes

    def mlp(s: int) -> nn.Module:
        torch.manual_seed(s)
        return nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, c))

    a, b = mlp(seed), mlp(partner_seed)
    init = _load(tmp_path / "run" / "init_model.pt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), init.values()))
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters()}], lr=lr, momentum=0.9)
    order_a, order_b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(partner_seed)
    perm_b, at = None, 0
    for _ in range(30):
        perm = torch.randperm(100, generator=order_a)
        # the epoch's Σ (CE_B + Ω)·|A batch|, Σ CE_B·|B batch| and Σ |B batch|, as the logs sum them
        term = torch.zeros(()), torch.zeros(()), 0
        for i in range(10):
            idx = perm[i * 10:(i + 1) * 10]
            if perm_b is None or at * 30 >= 400:
                perm_b, at = torch.randperm(400, generator=order_b), 0
            jdx = perm_b[at * 30:(at + 1) * 30]
            at += 1
            ce_b = F.cross_entropy(b(xb[jdx]), yb[jdx])
            omega = lam * sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters()))
            loss = F.cross_entropy(a(xa[idx]), ya[idx]) + ce_b + omega
            opt.zero_grad()
            loss.backward()
            opt.step()
            term = (term[0] + (ce_b + omega).detach() * 10, term[1] + ce_b.detach() * len(jdx), term[2] + len(jdx))

    for f, model in zip(FILES, (a, b)):
        got = _load(tmp_path / "run" / f)
        for (k, v), ref in zip(got.items(), model.state_dict().values()):
            torch.testing.assert_close(v, ref, atol=ATOL, rtol=RTOL, msg=f"{f} {k}")
    a.eval(), b.eval()
    with torch.no_grad():
        x, y = data_a.split("test")
        assert run["final"]["test_loss"] == pytest.approx(F.cross_entropy(a(x), y).item(), rel=RTOL)
        assert run["final"]["test_acc"] == pytest.approx((a(x).argmax(1) == y).float().mean().item(), abs=1e-6)
        for s in ("train", "val", "test"):
            x, y = data_b.split(s)
            assert run["extra"][f"parameter_tying/partner_{s}_loss"] == pytest.approx(
                F.cross_entropy(b(x), y).item(), rel=RTOL)
            assert run["extra"][f"parameter_tying/partner_{s}_acc"] == pytest.approx(
                (b(x).argmax(1) == y).float().mean().item(), abs=1e-6)
        dist = sum((p - q).pow(2).sum() for p, q in zip(a.parameters(), b.parameters())).sqrt().item()
    assert run["extra"]["parameter_tying/distance_to_partner"] == pytest.approx(dist, rel=RTOL)
    assert (run["extra"]["parameter_tying/tied_tensors"], run["extra"]["parameter_tying/free_tensors"]) == (4, 0)
    assert run["extra"]["parameter_tying/tied_params"] == sum(p.numel() for p in a.parameters())
    logged = {tag: v[-1] for tag, v in read_scalars(tmp_path / "run").items()}  # the last epoch's
    assert logged["penalty/parameter_tying"] == (30, pytest.approx(term[0].item() / 100, rel=1e-3))
    assert logged["parameter_tying/partner_train_running_loss"] == (
        30, pytest.approx(term[1].item() / term[2], rel=1e-3))
    assert logged["parameter_tying/distance_to_partner"] == (30, pytest.approx(dist, rel=1e-3))
    # partner_model.pt is the lone partner's state: it loads into the model the run builds
    from regexp.models import build_model

    build_model(cfg.model, data_b.input_shape, data_b.num_classes).load_state_dict(
        _load(tmp_path / "run" / "partner_model.pt"))


# Each combination the lone run takes: two members (differing seed and λ) as one population,
# each equal to its population of one.
@pytest.mark.parametrize("variant", [
    # the run's dropout, gradient clipping and decoupled decay act on A only, AdamW's own decay on both
    ["optimizer=adamw", "optimizer.weight_decay=0.01", "regularizer=[dropout,parameter_tying,decoupled_weight_decay]",
     "regularizer.dropout.p=0.2", "trainer.grad_clip=0.5"],
    # SAM's ascent moves the partner too, its second pass on the same partner batch
    ["optimizer=sam", "optimizer.base=momentum", "optimizer.momentum=0.9", "optimizer.rho=0.1"],
    # the partner's batch norm statistics (its running ones evaluated, saved and checkpointed)
    ["model.norm=batch"],
    # the partner's group between multi_task's head and the learned mixture (their optimizer
    # state in the lone order), Adam; early stopping (measured: at epoch 27 of 30) restoring A's
    # best epoch (26), from which the distance to the final partner is reported
    ["optimizer=adam", "optimizer.lr=0.03",
     "regularizer=[multi_task,parameter_tying,soft_weight_sharing,early_stopping]",
     "regularizer.early_stopping.patience=1", "regularizer.early_stopping.monitor=val_loss",
     "trainer.eval_every=1", "trainer.epochs=30"],
    # the other stacked models: the partner stacked in the bucket's class
    ["model=cnn_mnist1d", "model.channels=[3,4,5]", "optimizer=adam"],
    # (momentum, not Adam: the key bias's gradient is exactly 0 in exact arithmetic, so A's and
    # B's key biases are rounding noise and λ(a − b) too, which Adam's normalization turns into
    # steps that no other summation order reproduces; see tests/test_population_transformer.py)
    ["model=transformer", "model.depth=1", "model.heads=2", "model.mlp_ratio=2.0", "model.embed_dim=8",
     "optimizer=momentum", "optimizer.lr=0.05"],
    ["model=gru", "model.hidden_size=6", "optimizer=adam", "optimizer.lr=0.01"],
], ids=["adamw-dropout-clip", "sam", "batchnorm", "groups-early-stopping", "cnn", "transformer", "gru"])
def test_joint_members_of_every_combination_equal_each_alone(compose_cfg, tmp_path, variant):
    mlp = [] if variant[0].startswith("model=") else ["model.width=12"]
    base = compose_cfg(JOINT + mlp + [f"{KEY}.partner_batch_size=30", "trainer.epochs=4", "trainer.eval_every=2"]
                       + variant)
    points = [{"seed": 0, f"{KEY}.lam": 0.3}, {"seed": 1, f"{KEY}.lam": 1.0}]
    assert use_population(base, points)
    together = train_population(base, points, tmp_path / "pop")
    for p, run in zip(points, together):
        name = point_name(p)
        alone = train(point_config(base, p), tmp_path / "alone" / name)
        assert run.get("stopped_epoch") == alone.get("stopped_epoch") and run["best"]["epoch"] == alone["best"]["epoch"]
        if any("early_stopping" in v for v in variant):  # stopped after its best epoch, whose weights it restored
            assert alone["best"]["epoch"] < alone["stopped_epoch"] < 30
        _same_run(tmp_path / "pop" / name, tmp_path / "alone" / name, run, alone)


# ---------------------------------------------------------------- a population of three
@pytest.mark.parametrize("loop_width", [0, 1])
def test_population_of_three_joint_runs_equals_each_alone(compose_cfg, tmp_path, loop_width):
    """Members differing in seed (so in their data, partner seed and partner data), width (padded
    to 16 in one bucket), lr and λ train as one population, batched or member by member
    (``loop_width``: A's form; the partners' is batched); each ends as its population of one."""
    from regexp.population.engine import Options

    points = [{"seed": 0, "model.width": 12, "optimizer.lr": 0.05, f"{KEY}.lam": 0.1},
              {"seed": 1, "model.width": 16, "optimizer.lr": 0.02, f"{KEY}.lam": 1.0},
              {"seed": 2, "model.width": 9, "optimizer.lr": 0.1, f"{KEY}.lam": 0.0},
              # diverges in its first epoch: dropped from both stacks, the others go on
              {"seed": 3, "model.width": 12, "optimizer.lr": 1e5, f"{KEY}.lam": 0.1}]
    base = compose_cfg(JOINT + [f"{KEY}.partner_batch_size=30", "optimizer=momentum", "trainer.epochs=4",
                                "trainer.eval_every=2"])
    assert use_population(base, points)
    together = train_population(base, points, tmp_path / "pop", Options(loop_width=loop_width))
    assert {run["population_tuning"]["loop"] for run in together} == {bool(loop_width)}
    assert [run["status"] for run in together] == ["completed"] * 3 + ["diverged"]
    for p, run in zip(points[:3], together):
        name = point_name(p)
        alone = train(point_config(base, p), tmp_path / "alone" / name)
        assert alone["engine"] == "population"
        _same_run(tmp_path / "pop" / name, tmp_path / "alone" / name, run, alone)
    # each member's own partner: its seed's, trained on its own data
    partners = [_load(tmp_path / "pop" / point_name(p) / "partner_model.pt") for p in points[:2]]
    assert not torch.equal(partners[0]["head.bias"], partners[1]["head.bias"])


# ---------------------------------------------------------------- resume
def test_interrupted_joint_population_resumes_to_the_uninterrupted_one(compose_cfg, tmp_path, monkeypatch):
    """The partners' weights, optimizer state, data order and place in their own epoch (batches
    of 30 from 400 examples: its epochs end elsewhere than A's) come back from the members'
    checkpoints: the resumed population ends bitwise where the uninterrupted one does."""
    from regexp.population import engine

    points = [{"seed": 0, f"{KEY}.lam": 0.2}, {"seed": 1, f"{KEY}.lam": 0.5}]
    base = compose_cfg(JOINT + ["model.width=12", f"{KEY}.partner_batch_size=30", "optimizer=adam",
                                "trainer.epochs=3"])
    ref = train_population(base, points, tmp_path / "ref")
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(3))  # after step 1 of epoch 2 (2 steps per epoch)
    assert {m["status"] for m in train_population(base, points, tmp_path / "run")} == {"interrupted"}
    monkeypatch.undo()
    for p in points:  # mid-epoch, the partner 3 batches into its first epoch of 14
        ck = torch.load(tmp_path / "run" / point_name(p) / "checkpoint.pt", weights_only=True)
        tying = next(r for r in ck["regularizers"] if "partner" in r)
        assert (ck["epoch"], ck["step_in_epoch"], tying["step"]) == (1, 1, 3)
    resumed = train_population(base, points, tmp_path / "run")
    for p, r, m in zip(points, ref, resumed):
        assert m["history"] == r["history"] and m["extra"] == r["extra"]
        for f in FILES:
            a, b = (_load(tmp_path / d / point_name(p) / f) for d in ("run", "ref"))
            assert all(torch.equal(a[k], b[k]) for k in b), f

"""Population training against lone runs: same weights, metrics and files, member by member.

Stated tolerance: after 2 epochs (72 steps) every parameter of a member agrees with its lone
``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the summation order inside
the batched matrix products differs), and every logged metric within a relative 1e-4.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import StopAfter, read_scalars
from regexp.errors import ConfigError
from regexp.population import train_population, use_population
from regexp.population.compat import bucket_widths, mlp_cost
from regexp.population.optim import StackedOptimizer
from regexp.population.stacked_mlp import StackedMLP
from regexp.sweep import point_config, point_name, run_points
from regexp.train.trainer import train

ATOL, RTOL = 1e-5, 1e-4
# The fraction of hidden activations below 1e-3 in magnitude is a count: an activation within
# float32 rounding of the threshold falls on either side. Smooth units crowd around 0 (a GRU of
# hidden size 4: 320 features x 1,000 test signals, ~0.4% of them within 1e-3), so after
# training one or two may flip (measured: one); 1e-5 allows three in 320,000.
NEAR_ZERO_ATOL = 1e-5
BASE = ["trainer.epochs=2", "trainer.progress=false", "trainer.threads=1", "data.n_train=1200",
        "logger.histogram_every=1"]


def _pop_and_lone(compose_cfg, tmp_path: Path, overrides, points):
    base = compose_cfg(BASE + overrides)
    pop = train_population(base, points, tmp_path / "pop")
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    return base, pop, lone


def _assert_same_run(tmp_path: Path, point, pop, lone, atol: float = ATOL, state_atol: float = ATOL):
    name = point_name(point)
    a = torch.load(tmp_path / "pop" / name / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "lone" / name / "model.pt", weights_only=True)
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=RTOL)
    assert list(pop) == list(lone)  # the same keys in the same order
    assert pop["status"] == lone["status"] == "completed"
    assert pop["params"] == lone["params"] and pop["epochs"] == lone["epochs"]
    assert len(pop["history"]) == len(lone["history"])
    for rp, rl in zip(pop["history"], lone["history"]):
        assert rp.keys() == rl.keys()
        for k in rp:
            near = NEAR_ZERO_ATOL if k.endswith("near_zero_frac") else 1e-6
            assert rp[k] == pytest.approx(rl[k], rel=RTOL, abs=near), k
    assert pop["best"]["epoch"] == lone["best"]["epoch"]
    assert pop["extra"].keys() == lone["extra"].keys()
    for k in pop["extra"]:
        assert pop["extra"][k] == pytest.approx(lone["extra"][k], rel=RTOL, abs=1e-6), k
    # TensorBoard: the same scalar tags at the same steps with the same values
    sp, sl = read_scalars(tmp_path / "pop" / name), read_scalars(tmp_path / "lone" / name)
    assert set(sp) == set(sl)
    for tag in sl:
        assert [s for s, _ in sp[tag]] == [s for s, _ in sl[tag]], tag
        near = NEAR_ZERO_ATOL if tag.endswith("near_zero_frac") else 1e-6
        assert [v for _, v in sp[tag]] == pytest.approx([v for _, v in sl[tag]], rel=1e-3, abs=near), tag
    # every file a lone run leaves, with the same checkpoint layout
    files = {p.name for p in (tmp_path / "lone" / name).iterdir() if not p.name.startswith("events")}
    assert files <= {p.name for p in (tmp_path / "pop" / name).iterdir()}
    ip, il = (torch.load(tmp_path / d / name / "init_model.pt", weights_only=True) for d in ("pop", "lone"))
    assert ip.keys() == il.keys() and all(torch.equal(ip[k], il[k]) for k in il)  # the same start
    cp = torch.load(tmp_path / "pop" / name / "checkpoint.pt", weights_only=True)
    cl = torch.load(tmp_path / "lone" / name / "checkpoint.pt", weights_only=True)
    assert cp.keys() == cl.keys()
    assert cp["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cl["optimizer"]["param_groups"][0]["lr"])
    for i, st in cl["optimizer"]["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(cp["optimizer"]["state"][i][k], v, atol=max(atol, state_atol), rtol=1e-3)
    assert cp["scheduler"]["last_epoch"] == cl["scheduler"]["last_epoch"]
    assert torch.equal(cp["perm"], cl["perm"]) and (cp["epoch"], cp["step_in_epoch"]) == (cl["epoch"], 0)
    torch.testing.assert_close(cp["running"], cl["running"], atol=1e-3, rtol=RTOL)


def test_three_members_match_lone_runs_seeds_widths_lrs(compose_cfg, tmp_path):
    # two widths in one bucket, two lr values, three seeds (three different data splits)
    points = [{"model.width": 24, "optimizer.lr": 0.02, "seed": 0},
              {"model.width": 32, "optimizer.lr": 0.05, "seed": 1},
              {"model.width": 32, "optimizer.lr": 0.02, "seed": 2}]
    assert bucket_widths([24, 32]) == [[24, 32]]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, ["optimizer=momentum"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    # members really differ (seed, lr): their results are not copies of each other
    assert len({m["final"]["train_loss"] for m in pop}) == 3


def test_adamw_with_dropout_smoothing_decay_per_member(compose_cfg, tmp_path):
    # every elementwise hyperparameter differs; dropout masks are the lone runs' own draws
    points = [{"model.width": 20, "optimizer.lr": 0.01, "regularizer.dropout.p": 0.3,
               "regularizer.weight_decay.lam": 0.01, "regularizer.label_smoothing.eps": 0.1, "seed": 0},
              {"model.width": 16, "optimizer.lr": 0.003, "regularizer.dropout.p": 0.0,
               "regularizer.weight_decay.lam": 0.0, "regularizer.label_smoothing.eps": 0.2, "seed": 1}]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "optimizer=adamw", "regularizer=[weight_decay,dropout,label_smoothing]",
        "regularizer.dropout.input_p=0.1", "regularizer.dropout.mc_samples=2", "model.activation=tanh"],
        points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert "dropout/mc_test_acc" in pop[0]["extra"]


def test_shared_hyperparameters_use_the_fused_update(compose_cfg, tmp_path):
    points = [{"model.width": w, "seed": s} for w in (8, 12) for s in (0, 1)]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, ["optimizer=adam", "scheduler=cosine"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


@pytest.mark.parametrize("activation,opt", [("relu", "adam"), ("sigmoid", "momentum"), ("gelu", "sgd")])
def test_masked_units_stay_zero_with_zero_gradient(activation, opt):
    from regexp.models.mlp import MLP

    torch.manual_seed(0)
    models = [MLP(40, 10, w, 2, activation) for w in (3, 8)]
    net = StackedMLP(models, [3, 8], 8, activation, torch.device("cpu"))
    hp = ({"lr": [0.1, 0.2], "beta1": [0.9, 0.8], "beta2": [0.999, 0.99], "eps": [1e-8, 1e-8],
           "weight_decay": [0.0, 0.0]} if opt == "adam" else
          {"lr": [0.1, 0.2], "momentum": [0.9, 0.5] if opt == "momentum" else [0.0, 0.0],
           "dampening": [0.0, 0.0]})
    optim = StackedOptimizer(opt, net.params, hp, False, torch.device("cpu"))
    x = torch.randn(2, 16, 40)
    y = torch.randint(0, 10, (2, 16))
    for _ in range(3):
        for p in net.params:
            p.grad = None
        logits = net.forward(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 10), y.reshape(-1)).backward()
        w0, b0, w1, b1, w2, _ = net.params
        padded_grads = [w0.grad[0, 3:], b0.grad[0, :, 3:], w1.grad[0, 3:], w1.grad[0, :, 3:],
                        b1.grad[0, :, 3:], w2.grad[0, :, 3:]]
        assert all(torch.equal(g, torch.zeros_like(g)) for g in padded_grads)
        optim.step(1.0)
        padded = [w0[0, 3:], b0[0, :, 3:], w1[0, 3:], w1[0, :, 3:], b1[0, :, 3:], w2[0, :, 3:]]
        assert all(torch.equal(t, torch.zeros_like(t)) for t in padded)
    # the narrow member computes what its lone model computes with the same weights
    state = net.member_state(0)
    models[0].load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x)[0], models[0](x[0]), atol=1e-5, rtol=1e-5)
    assert state["hidden.0.weight"].shape == (3, 40) and state["head.weight"].shape == (10, 3)


@pytest.mark.parametrize("epochs", [1, 2])  # 1: the member diverges in the last epoch
def test_diverging_member_is_marked_while_the_others_finish(compose_cfg, tmp_path, epochs):
    points = [{"optimizer.lr": lr, "seed": 0} for lr in (0.05, 1e6, 0.1)]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, ["optimizer=sgd", "model.width=16",
                                                            f"trainer.epochs={epochs}"], points)
    assert [m["status"] for m in pop] == [m["status"] for m in lone] == ["completed", "diverged", "completed"]
    assert pop[1]["diverged_epoch"] == lone[1]["diverged_epoch"]
    bad = tmp_path / "pop" / point_name(points[1])
    assert json.loads((bad / "metrics.json").read_text())["status"] == "diverged"
    assert not (bad / "model.pt").exists()
    assert read_scalars(bad)["diverged"][0][1] == 1.0
    for i in (0, 2):
        _assert_same_run(tmp_path, points[i], pop[i], lone[i])


def test_outputs_are_separate_and_a_rerun_skips_completed(compose_cfg, tmp_path):
    base = compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=1"])
    points = [{"model.width": w, "seed": 0} for w in (4, 6)]
    first = train_population(base, points, tmp_path)
    for p, m in zip(points, first):
        d = tmp_path / point_name(p)
        on_disk = json.loads((d / "metrics.json").read_text())
        assert on_disk["overrides"] == [f"model.width={p['model.width']}", "seed=0"]
        assert on_disk["params"] == 40 * p["model.width"] + p["model.width"] + p["model.width"] ** 2 \
            + p["model.width"] + p["model.width"] * 10 + 10
        assert len(list(d.glob("events.out.tfevents.*"))) == 1
        assert torch.load(d / "model.pt", weights_only=True)["hidden.0.weight"].shape == (p["model.width"], 40)
    again = train_population(base, points, tmp_path)
    assert all(m.get("skipped") for m in again)


@pytest.mark.parametrize("depth", [1, 2])
def test_buckets_group_similar_widths_and_never_pad_all_to_the_largest(depth):
    widths = [4, 6, 10, 16, 26, 42, 68, 110, 178, 288, 466, 700, 1024]
    cost = mlp_cost(40, depth, 10)
    buckets = bucket_widths(widths, ratio=1.5, small=32, cost=cost)
    assert sorted(w for b in buckets for w in b) == widths
    assert len(buckets) > 1 and max(buckets[-1]) == 1024 and min(buckets[-1]) > 4
    for b in buckets:  # no member computes more than 1.5x its own work, except tiny ones
        assert max(b) <= 32 or cost(max(b)) <= 1.5 * cost(min(b))
    if depth == 1:  # linear cost: 700 and 1024 (ratio 1.46) share a bucket ...
        assert [700, 1024] in buckets
    else:  # ... quadratic cost: they do not (2.1x the work)
        assert [700] in buckets and [1024] in buckets


def test_logistic_regression_members_match_lone_runs(compose_cfg, tmp_path):
    # depth 0: one linear layer; its width is unused, so every width shares one bucket
    points = [{"model.width": w, "optimizer.lr": lr, "seed": s} for w, lr, s in ((8, 0.01, 0), (64, 0.02, 1))]
    assert bucket_widths([8, 64], cost=mlp_cost(40, 0, 10)) == [[8, 64]]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, ["optimizer=adam", "model.depth=0"], points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        assert a["params"] == 410


def test_engine_choice(compose_cfg, tmp_path):
    points = [{"model.width": 8, "seed": 0}]
    assert use_population(compose_cfg(BASE), points)
    assert not use_population(compose_cfg(BASE + ["sweep.engine=serial"]), points)
    assert use_population(compose_cfg(BASE + ["model=cnn"]), [{"seed": 0}])
    assert use_population(compose_cfg(BASE + ["model=cnn", "model.norm=batch"]), [{"seed": 0}])
    assert use_population(compose_cfg(BASE + ["model=cnn", "regularizer=[dropout]"]), [{"seed": 0}])
    with pytest.raises(ConfigError, match="regularizer tangent_prop with model=transformer"):
        use_population(compose_cfg(BASE + ["model=transformer", "regularizer=[tangent_prop]",
                                           "sweep.engine=population"]), [{"seed": 0}])
    assert use_population(compose_cfg(BASE + ["model=gru"]), [{"seed": 0}])
    with pytest.raises(ConfigError, match="regularizer weight_noise with model=gru"):
        use_population(compose_cfg(BASE + ["model=gru", "regularizer=[weight_noise]", "sweep.engine=population"]),
                       [{"seed": 0}])
    assert use_population(compose_cfg(BASE + ["regularizer=[ensemble]"]), [{"seed": 0}])
    assert not use_population(compose_cfg(BASE + ["regularizer=[ensemble,multi_task]"]), [{"seed": 0}])
    with pytest.raises(ConfigError, match=r"regularizer multi_task with ensemble \("):
        use_population(compose_cfg(BASE + ["regularizer=[ensemble,multi_task]", "sweep.engine=population"]),
                       [{"seed": 0}])
    with pytest.raises(ConfigError, match="sweep.engine"):
        use_population(compose_cfg(BASE + ["sweep.engine=fast"]), points)


def test_run_points_dispatches_to_the_population(compose_cfg, tmp_path):
    base = compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=1", "sweep.engine=population"])
    points = [{"model.width": w, "seed": 0} for w in (4, 8)]
    rows = run_points(base, points, tmp_path / "pop")
    serial = run_points(compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=1", "sweep.engine=serial"]),
                        points, tmp_path / "serial")
    for a, b in zip(rows, serial):
        assert a.keys() == b.keys() and a["status"] == b["status"] == "completed"
        assert a["test_error"] == pytest.approx(b["test_error"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=RTOL)


@pytest.mark.parametrize("name,lrs", [("adam", [0.1, 0.1]), ("adam", [0.1, 0.2]), ("momentum", [0.1, 0.2])])
def test_dropping_a_member_leaves_the_others_updates_unchanged(name, lrs):
    # what happens to the survivors when a diverged member is removed from the stacked state
    torch.manual_seed(0)
    start, grads = torch.randn(2, 3, 4), [torch.randn(2, 3, 4) for _ in range(4)]

    def hp(lr):
        extra = ({"beta1": [0.9] * len(lr), "beta2": [0.99] * len(lr), "eps": [1e-8] * len(lr),
                  "weight_decay": [0.0] * len(lr)} if name == "adam" else
                 {"momentum": [0.9] * len(lr), "dampening": [0.0] * len(lr)})
        return {"lr": lr, **extra}

    p = start.clone().requires_grad_()
    opt = StackedOptimizer(name, [p], hp(lrs), False, torch.device("cpu"))
    for k, g in enumerate(grads):
        if k == 2:
            p = p.detach()[1:].clone().requires_grad_()
            opt.keep(torch.tensor([1]))
            opt.set_params([p])
        p.grad = g[-p.shape[0]:]
        opt.step(1.0)
    q = start[1:].clone().requires_grad_()
    alone = StackedOptimizer(name, [q], hp(lrs[1:]), False, torch.device("cpu"))
    for g in grads:
        q.grad = g[1:]
        alone.step(1.0)
    torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert not torch.equal(q, start[1:])


def test_label_noise_no_validation_split_and_a_larger_test_set(compose_cfg, tmp_path):
    # the double-descent setting: noisy labels (per seed), no validation split, 1500 test signals
    points = [{"model.width": w, "seed": s} for w, s in ((12, 0), (16, 1))]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "optimizer=sgd", "data.val_fraction=0", "data.label_noise=0.2", "data.n_test=1500"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        assert "val_acc" not in a["final"] and not (tmp_path / "pop" / point_name(p) / "best_model.pt").exists()
        noise = json.loads((tmp_path / "pop" / point_name(p) / "label_noise.json").read_text())
        assert noise == json.loads((tmp_path / "lone" / point_name(p) / "label_noise.json").read_text())


def test_bf16_autocast_trains_close_to_float32(compose_cfg, tmp_path):
    from regexp.population import Options

    base = compose_cfg(BASE + ["optimizer=adam", "trainer.epochs=1"])
    points = [{"model.width": 16, "seed": 0}]
    exact = train_population(base, points, tmp_path / "f32", Options())
    half = train_population(base, points, tmp_path / "bf16", Options(bf16=True))
    assert half[0]["status"] == "completed"
    # bf16 products (8-bit mantissa) move the loss, but not far: the same model is learned
    assert half[0]["final"]["train_loss"] != exact[0]["final"]["train_loss"]
    assert half[0]["final"]["train_loss"] == pytest.approx(exact[0]["final"]["train_loss"], rel=0.05)


@pytest.mark.slow
def test_torch_compile_gives_the_same_weights(compose_cfg, tmp_path):
    from regexp.population import Options

    base = compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=1"])
    points = [{"model.width": 8, "seed": 0}, {"model.width": 12, "seed": 1}]
    plain = train_population(base, points, tmp_path / "eager", Options())
    compiled = train_population(base, points, tmp_path / "compiled", Options(compile=True))
    for p, a, b in zip(points, plain, compiled):
        assert b["status"] == "completed"
        wa = torch.load(tmp_path / "eager" / point_name(p) / "model.pt", weights_only=True)
        wb = torch.load(tmp_path / "compiled" / point_name(p) / "model.pt", weights_only=True)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("loop_width", [0, 1])
def test_batched_and_member_loop_forms_both_match_lone_runs(compose_cfg, tmp_path, loop_width):
    # loop_width=1 computes every bucket member by member (the CPU form for wide buckets),
    # 0 always with batched products; both must equal the lone runs, dropout included
    from regexp.population import Options

    base = compose_cfg(BASE + ["optimizer=nesterov", "regularizer=[dropout]", "regularizer.dropout.p=0.2",
                               "trainer.epochs=1"])
    points = [{"model.width": 20, "seed": 0}, {"model.width": 28, "seed": 1}]
    pop = train_population(base, points, tmp_path / "pop", Options(loop_width=loop_width))
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


@pytest.mark.parametrize("optimizer,mid_epoch,schedules", [("momentum", True, False), ("adam", False, False),
                                                        ("momentum", True, True)])
def test_interrupted_population_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path, monkeypatch,
                                                                    optimizer, mid_epoch, schedules):
    """SIGTERM in the middle of epoch 2: every member leaves train()'s checkpoint of that very
    step (momentum buffers, dropout RNG, data order, partial loss sums); re-launching the sweep
    resumes them together as a population from that step, and each ends where its lone
    uninterrupted run ends (the stated tolerance), with the same history and TensorBoard curves."""
    import math

    import regexp.population.engine as engine
    from regexp.data import load_data

    overrides = [f"optimizer={optimizer}", "regularizer=[dropout]", "trainer.epochs=3", "trainer.batch_size=100"]
    points = [{"model.width": w, "seed": s} for w, s in ((12, 0), (16, 1))]
    if schedules:  # each member's own step decay: its factor resumes with it
        overrides += ["scheduler=step", "scheduler.step_size=5"]
        points = [{**p, "scheduler.gamma": g} for p, g in zip(points, (0.5, 0.8))]
    base = compose_cfg(BASE + overrides)
    steps = math.ceil(len(load_data(base.data, 0).y_train) / 100)
    # the loop asks once per step and once after each epoch's end: stop in the middle of epoch
    # 2 or right after epoch 1
    in_epoch = steps // 2 + 1 if mid_epoch else 0
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(steps + in_epoch))
    stopped = train_population(base, points, tmp_path / "pop")
    monkeypatch.undo()
    for p, m in zip(points, stopped):
        assert m["status"] == "interrupted" and m["epochs"] == 1 and m["signal"] == 15
        ck = torch.load(tmp_path / "pop" / point_name(p) / "checkpoint.pt", weights_only=True)
        assert (ck["epoch"], ck["step_in_epoch"]) == (1, in_epoch)
        assert ck["scheduler"]["last_epoch"] == steps + in_epoch
    # the re-launch resumes both in one population, from the step where they stopped
    positions = []
    real = engine.train_bucket
    monkeypatch.setattr(engine, "train_bucket", lambda ms, *a, **k: (positions.append([m.position for m in ms]),
                                                                      real(ms, *a, **k))[1])
    import regexp.population.run as run
    monkeypatch.setattr(run, "train_bucket", engine.train_bucket)
    resumed = train_population(base, points, tmp_path / "pop")
    assert positions == [[(1, in_epoch, steps + in_epoch)] * 2]
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, resumed, lone):
        assert a["status"] == "completed" and a["epochs"] == 3
        wa = torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)
        wb = torch.load(tmp_path / "lone" / point_name(p) / "model.pt", weights_only=True)
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL)
        assert len(a["history"]) == len(b["history"]) == 3
        for ra, rb in zip(a["history"], b["history"]):
            assert ra == pytest.approx(rb, rel=RTOL, abs=1e-6)
        sa, sb = read_scalars(tmp_path / "pop" / point_name(p)), read_scalars(tmp_path / "lone" / point_name(p))
        assert set(sa) == set(sb)
        for tag in sb:  # one value per epoch (no step twice), across the run's two event files
            a_, b_ = sorted(sa[tag]), sorted(sb[tag])
            assert [s for s, _ in a_] == [s for s, _ in b_], tag
            assert [v for _, v in a_] == pytest.approx([v for _, v in b_], rel=1e-3, abs=1e-6), tag


def test_population_writes_periodic_checkpoints(compose_cfg, tmp_path, monkeypatch):
    import regexp.population.engine as engine

    saved = []
    real = engine.save_torch
    monkeypatch.setattr(engine, "save_torch", lambda path, obj: (saved.append((path.parent.name, obj["epoch"],
                                                                                obj["status"])), real(path, obj)))
    base = compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=3", "trainer.checkpoint_every=1"])
    points = [{"model.width": w, "seed": 0} for w in (4, 6)]
    train_population(base, points, tmp_path)
    # epochs 1 and 2 (the last epoch's checkpoint is the final one, written when the member finishes)
    assert sorted(saved) == sorted((point_name(p), e, "running") for p in points for e in (1, 2))


def test_hits_equal_argmax_including_ties():
    from regexp.population.engine import hits

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 10, 300, generator=g)
    y = torch.randint(0, 10, (4, 300), generator=g)
    z[0, 3, :10] = z[0, 5, :10] = 100.0  # a tie: argmax takes class 3
    y[0, :5], y[0, 5:10] = 3, 5
    z[1, :, :20] = 0.0  # all classes tied: class 0
    y[1, :10] = 0
    got = hits(z, y)
    assert torch.equal(got, z.argmax(1) == y)
    assert got[0, :5].all() and not got[0, 5:10].any() and got[1, :10].all()


@pytest.mark.parametrize("loop_width,smoothing", [(0, 0.0), (1, 0.0), (0, 0.1)])
def test_input_and_weight_noise_per_member_match_lone_runs(compose_cfg, tmp_path, loop_width, smoothing):
    """σ of input and weight noise differs per member (0 included: a lone run still draws);
    each member's noise and dropout masks are its lone run's own draws, in its order, in the
    batched and member-by-member forms, by hand-written gradients and by autograd (smoothing)."""
    from regexp.population import Options

    base = compose_cfg(BASE + [
        "optimizer=momentum", "regularizer=[input_noise,dropout,weight_noise,label_smoothing]",
        "regularizer.dropout.p=0.2", "regularizer.dropout.input_p=0.1", f"regularizer.label_smoothing.eps={smoothing}",
        "regularizer.weight_noise.include_head=false", "trainer.epochs=1"])
    points = [{"model.width": 20, "regularizer.input_noise.sigma": 0.3, "regularizer.weight_noise.sigma": 0.05,
               "seed": 0},
              {"model.width": 28, "regularizer.input_noise.sigma": 0.0, "regularizer.weight_noise.sigma": 0.02,
               "seed": 1},
              {"model.width": 28, "regularizer.input_noise.sigma": 0.1, "regularizer.weight_noise.sigma": 0.0,
               "seed": 1}]
    assert use_population(base, points)
    pop = train_population(base, points, tmp_path / "pop", Options(loop_width=loop_width))
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    # the noise is real: the same seed and width with other σ ends with other weights
    w1, w2 = (torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)["hidden.0.weight"] for p in points[1:])
    assert (w1 - w2).abs().max() > 1e-3


@pytest.mark.parametrize("exact", [True, False])
def test_step_noise_leaves_padding_zero(exact):
    from regexp.population.dropout import MemberDropout
    from regexp.population.noise import StepNoise

    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    drop = MemberDropout([0.0, 0.0], [0.5, 0.0], gens, [3, 5], 4, 5, 1, torch.device("cpu"), exact, 0)
    noise = StepNoise(drop, [0.1, 0.2], [0.05, 0.05], [True, True], torch.device("cpu"))
    weights = [torch.zeros(2, 5, 4), torch.zeros(2, 2, 5)]
    weights[0][0, :3], weights[0][1], weights[1][0, :, :3], weights[1][1] = 1.0, 1.0, 1.0, 1.0
    x, masks, used = noise.draw(torch.zeros(2, 6, 4), weights, [3, 5])
    assert (x != 0).all()  # every input element of both members got noise
    assert masks[0] is None and masks[1].shape == (2, 6, 5) and (masks[1][1] == 1).all()
    for w, u in zip(weights, used):
        assert torch.equal(u[w == 0], torch.zeros_like(u[w == 0]))  # padding: no noise
        assert (u[w != 0] != 1.0).all()  # real weights: noise on each one


def test_batched_randomness_mode_keeps_padding_zero(compose_cfg, tmp_path, monkeypatch):
    """The GPU mode (one call draws every member's masks and noise: the same distributions,
    not the lone runs' numbers), run here on the CPU: padded units never get noise or
    gradient, and the members train to finite losses other than the exact mode's."""
    import math

    import regexp.population.engine as engine
    from regexp.population import Options

    base = compose_cfg(BASE + ["optimizer=momentum", "regularizer=[input_noise,dropout,weight_noise]",
                               "regularizer.dropout.p=0.3", "regularizer.dropout.input_p=0.1",
                               "regularizer.weight_noise.sigma=0.05", "trainer.epochs=1"])
    points = [{"model.width": 12, "seed": 0}, {"model.width": 16, "seed": 1}]
    assert bucket_widths([12, 16]) == [[12, 16]]
    stacked = []
    real = engine._finish_completed
    monkeypatch.setattr(engine, "_finish_completed",
                        lambda b, k, *a: (stacked.append([w.detach().clone() for w in b.net.weights]),
                                          real(b, k, *a))[1])
    batched = train_population(base, points, tmp_path / "batched", Options(exact_dropout=False))
    w_in, w_hidden, w_out = stacked[0]  # two hidden layers; member 0 has 4 padded units in each
    padded = [w_in[0, 12:], w_hidden[0, 12:], w_hidden[0, :, 12:], w_out[0, :, 12:]]
    assert all(torch.equal(t, torch.zeros_like(t)) for t in padded)
    assert (w_in[0, :12] != 0).all() and (w_hidden[0, :12, :12] != 0).all()
    exact = train_population(base, points, tmp_path / "exact", Options(exact_dropout=True))
    for a, b in zip(batched, exact):
        assert a["status"] == "completed" and math.isfinite(a["final"]["train_loss"])
        assert a["final"]["train_loss"] != b["final"]["train_loss"]


def test_a_crashed_population_resumes_from_its_periodic_checkpoints(compose_cfg, tmp_path, monkeypatch):
    """A crash in epoch 3 (no signal, no final checkpoint) loses only that epoch: with
    trainer.checkpoint_every=1 the re-launch resumes every member from epoch 2's checkpoint
    and ends where the lone uninterrupted runs end."""
    import regexp.population.engine as engine

    base = compose_cfg(BASE + ["optimizer=adamw", "trainer.epochs=3", "trainer.checkpoint_every=1"])
    points = [{"model.width": w, "seed": s} for w, s in ((10, 0), (14, 1))]
    real = engine._epoch_end

    def crash_in_epoch_3(b, epoch, *a):
        if epoch == 3:
            raise RuntimeError("the machine went away")
        return real(b, epoch, *a)

    monkeypatch.setattr(engine, "_epoch_end", crash_in_epoch_3)
    crashed = train_population(base, points, tmp_path / "pop")
    assert [m["status"] for m in crashed] == ["failed", "failed"]
    monkeypatch.undo()
    for p in points:
        ck = torch.load(tmp_path / "pop" / point_name(p) / "checkpoint.pt", weights_only=True)
        assert (ck["epoch"], ck["step_in_epoch"], ck["status"]) == (2, 0, "running")
    resumed = train_population(base, points, tmp_path / "pop")
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, resumed, lone):
        assert a["status"] == "completed" and [r["epoch"] for r in a["history"]] == [1, 2, 3]
        wa = torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)
        wb = torch.load(tmp_path / "lone" / point_name(p) / "model.pt", weights_only=True)
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL)
        for ra, rb in zip(a["history"], b["history"]):
            assert ra == pytest.approx(rb, rel=RTOL, abs=1e-6)

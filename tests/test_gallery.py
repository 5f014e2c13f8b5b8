"""The textbook gallery: every experiment composes, the optimizer paths follow the textbook
update formulas, and a shortened run of each writes its figure (PNG + TensorBoard image) and
CSVs whose numbers agree with the runs they came from."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from regexp.config import validate
from regexp.experiments import _groups
from regexp.experiments.optimizer_paths import FUNCTIONS, path
from regexp.sweep import read_csv
from regexp.tasks import TASKS
from regexp.train.io import read_json

GALLERY = ["optimizer_paths", "init_activation", "normalization", "implicit_regularization",
           "function_fits", "schedules", "optimizer_comparison", "cross_validation"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A small, fast MNIST-1D setting for the shortened runs.
QUICK = ["trainer.threads=1", "trainer.progress=false", "data.n_train=200", "trainer.epochs=2",
         "logger.grad_norms=false"]


def run(compose_cfg, name, overrides, out: Path):
    """Compose ``+experiment=name`` with ``overrides`` and run its task in-process."""
    cfg = compose_cfg([f"+experiment={name}", *overrides])
    validate(cfg)
    torch.set_num_threads(1)
    metrics = TASKS[cfg.task](cfg, out, list(overrides), False)
    assert metrics["status"] == "completed", metrics
    return cfg, metrics


def assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000, path


def tb_images(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    return set(acc.Tags()["images"])


def floats(rows, key):
    return [float(r[key]) for r in rows]


# ------------------------------------------------------------------ composition
@pytest.mark.parametrize("name", GALLERY)
def test_every_experiment_composes_into_its_own_task(compose_cfg, name):
    import regexp.experiments  # noqa: F401  (registers the tasks)

    cfg = compose_cfg([f"+experiment={name}"])
    validate(cfg)
    assert cfg.task == name and name in TASKS
    assert cfg.extra, "the experiment's settings live under extra:"


def test_unknown_extra_key_is_a_config_error(compose_cfg, tmp_path):
    from regexp.errors import ConfigError

    cfg = compose_cfg(["+experiment=schedules", "+extra.total_step=10"])
    with pytest.raises(ConfigError, match=r"extra\.total_step is invalid .*extra\.total_steps"):
        TASKS["schedules"](cfg, tmp_path, [], False)
    cfg = compose_cfg(["+experiment=optimizer_paths", "extra.functions=[bowl,himmelblau]"])
    with pytest.raises(ConfigError, match=r"extra\.functions='himmelblau' is invalid"):
        TASKS["optimizer_paths"](cfg, tmp_path, [], False)


@pytest.mark.parametrize("name", ["function_fits", "init_activation"])
def test_experiments_drawn_per_hidden_unit_refuse_logistic_regression(compose_cfg, tmp_path, name):
    from regexp.errors import ConfigError

    cfg = compose_cfg([f"+experiment={name}", "model.depth=0"])
    validate(cfg)  # depth 0 is a valid model (logistic regression) ...
    with pytest.raises(ConfigError, match=r"^model\.depth=0 is invalid: expected an integer >= 1 "):
        TASKS[name](cfg, tmp_path, [], False)  # ... but these figures need hidden units
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ optimizer paths: the mathematics
def optimizer(name, **kw):
    c = _groups.group_config("optimizer", name)
    for k, v in kw.items():
        c[k] = v
    return c


def test_one_gd_step_on_the_ellipse_lands_on_the_textbook_point():
    pts = path(FUNCTIONS["ellipse"], optimizer("sgd", lr=0.1), 1, start=(-5.0, -2.0))
    assert pts[0].tolist() == [-5.0, -2.0]
    assert pts[1].tolist() == pytest.approx([-4.9, -1.2], abs=1e-12)


def grad_ellipse(w):  # E(w) = 0.1 w1² + 2 w2²
    return torch.tensor([0.2 * w[0], 4.0 * w[1]], dtype=torch.float64)


def by_hand(name, steps, lr, **h):
    """The textbook updates on the ellipse from (-5, -2), written out formula by formula."""
    w = torch.tensor([-5.0, -2.0], dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)   # velocity / first moment
    r = torch.zeros(2, dtype=torch.float64)   # accumulated / averaged squared gradient
    u = torch.zeros(2, dtype=torch.float64)   # AdaDelta's averaged squared update
    out = [w.clone()]
    for t in range(1, steps + 1):
        if name == "nesterov":  # Sutskever: gradient at the look-ahead point w + ρv
            g = grad_ellipse(w + h["rho"] * v)
            v = h["rho"] * v - lr * g
            w = w + v
            out.append(w + h["rho"] * v)  # torch stores the look-ahead point itself
            continue
        g = grad_ellipse(w)
        if name == "sgd":
            w = w - lr * g
        elif name == "momentum":  # v ← ρv − ηg, w ← w + v
            v = h["rho"] * v - lr * g
            w = w + v
        elif name == "adagrad":  # r ← r + g², w ← w − η g / (√r + δ)
            r = r + g * g
            w = w - lr * g / (r.sqrt() + h["eps"])
        elif name == "rmsprop":  # r ← ρr + (1−ρ) g², w ← w − η g / (√r + δ)
            r = h["rho"] * r + (1 - h["rho"]) * g * g
            w = w - lr * g / (r.sqrt() + h["eps"])
        elif name == "adadelta":  # Zeiler: Δ = √(u+ε)/√(r+ε) g; u ← ρu + (1−ρ)Δ²; w ← w − ηΔ
            r = h["rho"] * r + (1 - h["rho"]) * g * g
            d = (u + h["eps"]).sqrt() / (r + h["eps"]).sqrt() * g
            u = h["rho"] * u + (1 - h["rho"]) * d * d
            w = w - lr * d
        elif name == "adam":  # bias-corrected moments
            v = h["b1"] * v + (1 - h["b1"]) * g
            r = h["b2"] * r + (1 - h["b2"]) * g * g
            m_hat, r_hat = v / (1 - h["b1"] ** t), r / (1 - h["b2"] ** t)
            w = w - lr * m_hat / (r_hat.sqrt() + h["eps"])
        out.append(w.clone())
    return torch.stack(out)


@pytest.mark.parametrize("name,lr,hyper,cfg_keys", [
    ("sgd", 0.4, {}, {}),
    ("momentum", 0.05, {"rho": 0.9}, {}),
    ("momentum", 0.05, {"rho": 0.5}, {"momentum": 0.5}),
    ("nesterov", 0.05, {"rho": 0.9}, {}),
    ("adagrad", 0.7, {"eps": 1e-10}, {}),
    ("rmsprop", 0.1, {"rho": 0.99, "eps": 1e-8}, {}),
    ("adadelta", 10.0, {"rho": 0.9, "eps": 1e-6}, {}),
    ("adam", 0.3, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}, {}),
])
def test_framework_paths_equal_the_textbook_updates(name, lr, hyper, cfg_keys):
    steps = 6
    got = path(FUNCTIONS["ellipse"], optimizer(name, lr=lr, **cfg_keys), steps, start=(-5.0, -2.0))
    want = by_hand(name, steps, lr, **hyper)
    assert got.shape == (steps + 1, 2)
    assert got.tolist() == [pytest.approx(p, rel=1e-9, abs=1e-12) for p in want.tolist()]
    assert not torch.equal(got[-1], got[0])  # it moved


# ------------------------------------------------------------------ shortened runs
def test_optimizer_paths_run_uses_command_line_optimizer(compose_cfg, tmp_path):
    overrides = ["optimizer=momentum", "optimizer.momentum=0.5", "optimizer.lr=0.02",
                 "extra.functions=[ellipse,rosenbrock]", "extra.steps.ellipse=4", "extra.steps.rosenbrock=3"]
    run(compose_cfg, "optimizer_paths", overrides, tmp_path)
    assert_png(tmp_path / "paths.png")
    assert "figures/paths" in tb_images(tmp_path)
    rows = read_csv(tmp_path / "paths.csv")
    assert {r["optimizer"] for r in rows} == {"sgd", "momentum", "nesterov", "adagrad", "rmsprop",
                                              "adadelta", "adam"}
    mom = [r for r in rows if r["function"] == "ellipse" and r["optimizer"] == "momentum"]
    assert [int(r["step"]) for r in mom] == [0, 1, 2, 3, 4] and {r["lr"] for r in mom} == {"0.02"}
    want = by_hand("momentum", 4, 0.02, rho=0.5)
    assert [[float(r["x"]), float(r["y"])] for r in mom] == [pytest.approx(p) for p in want.tolist()]
    for r in mom:  # f is the function's value at the iterate
        assert float(r["f"]) == pytest.approx(0.1 * float(r["x"]) ** 2 + 2 * float(r["y"]) ** 2)
    # the others keep the YAML's per-function rates
    sgd = [r for r in rows if r["function"] == "rosenbrock" and r["optimizer"] == "sgd"]
    assert {r["lr"] for r in sgd} == {"0.002"} and len(sgd) == 4
    summary = read_csv(tmp_path / "summary.csv")
    assert len(summary) == 14 and all(r["escaped"] == "False" for r in summary)


def test_schedules_curves_follow_the_scheduler_formulas(compose_cfg, tmp_path):
    overrides = ["extra.total_steps=60", "scheduler=step", "scheduler.step_size=10", "scheduler.gamma=0.5",
                 "optimizer.lr=0.2"]
    run(compose_cfg, "schedules", overrides, tmp_path)
    assert_png(tmp_path / "schedules.png")
    assert "figures/schedules" in tb_images(tmp_path)
    rows = read_csv(tmp_path / "schedules.csv")
    assert list(rows[0]) == ["t", "constant", "step", "cosine", "warmup_cosine", "cosine_restarts"]
    assert [int(r["t"]) for r in rows] == list(range(60))
    assert floats(rows, "constant") == pytest.approx([0.2] * 60)
    assert floats(rows, "step") == pytest.approx([0.2 * 0.5 ** (t // 10) for t in range(60)])
    assert floats(rows, "cosine") == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 60)) for t in range(60)])
    wc = floats(rows, "warmup_cosine")  # configs/scheduler/warmup_cosine.yaml: 100 warmup steps
    assert wc == pytest.approx([0.2 * (t + 1) / 100 for t in range(60)])


def test_optimizer_comparison_curves_are_the_runs_histories(compose_cfg, tmp_path):
    overrides = [*QUICK, "extra.optimizers=[sgd,adam]", "extra.seeds=[0]", "+extra.lr.sgd=0.1",
                 "model.width=16"]
    run(compose_cfg, "optimizer_comparison", overrides, tmp_path)
    assert_png(tmp_path / "loss_curves.png")
    assert "figures/loss_curves" in tb_images(tmp_path)
    results = read_csv(tmp_path / "results.csv")
    assert [r["optimizer"] for r in results] == ["sgd", "adam"]
    curves = read_csv(tmp_path / "curves.csv")
    for name, lr in (("sgd", 0.1), ("adam", 0.001)):
        m = read_json(tmp_path / f"optimizer={name}" / "seed=0" / "metrics.json")
        assert m["status"] == "completed" and m["overrides"] == ["seed=0"]
        mine = [r for r in curves if r["optimizer"] == name]
        assert floats(mine, "train_loss") == pytest.approx([h["train_loss"] for h in m["history"]])
        row = next(r for r in results if r["optimizer"] == name)
        assert float(row["test_error"]) == pytest.approx(1 - m["final"]["test_acc"])
        cfg = torch.load(tmp_path / f"optimizer={name}" / "seed=0" / "checkpoint.pt",
                         weights_only=False)["config"]
        assert cfg["optimizer"]["name"] == name and cfg["optimizer"]["lr"] == pytest.approx(lr)


def test_init_activation_shows_vanishing_gradients(compose_cfg, tmp_path):
    overrides = [*QUICK, "trainer.epochs=1", "model.depth=5", "model.width=32", "extra.activations=[sigmoid,relu]",
                 "extra.inits=[normal,he]", "extra.norms=[none,batch]", "extra.probe_size=128"]
    run(compose_cfg, "init_activation", overrides, tmp_path)
    for name in ("accuracy", "gradients", "activations", "grid"):
        assert_png(tmp_path / f"{name}.png")
        assert f"figures/{name}" in tb_images(tmp_path)
    assert len(read_csv(tmp_path / "results.csv")) == 8
    layers = read_csv(tmp_path / "layers.csv")

    def grads(act, init, norm, when="init"):
        chosen = [r for r in layers if (r["model.activation"], r["model.init"], r["model.norm"], r["when"])
                  == (act, init, norm, when)]
        return [float(r["grad_norm"]) for r in sorted(chosen, key=lambda r: int(r["layer"]))]

    g = grads("sigmoid", "normal", "none")
    assert len(g) == 6  # 5 hidden layers and the head
    # normal(0.01) + sigmoid: each layer back multiplies the gradient by ~ 0.25 · 0.01 · √width
    assert all(a < b / 10 for a, b in zip(g, g[1:]))
    assert g[0] < 1e-6 * g[-1]
    he = grads("relu", "he", "none")
    assert he[0] > 0.05 * he[-1]  # He initialization keeps the first layer's gradient alive
    bn = grads("sigmoid", "normal", "batch")
    assert bn[0] > 1e-3 * bn[-1]  # batch normalization rescues the bad pair
    assert {r["when"] for r in layers} == {"init", "trained"}
    acts = [float(r["act_std"]) for r in layers if r["act_std"] != "" and r["model.activation"] == "relu"
            and r["model.init"] == "normal" and r["model.norm"] == "none" and r["when"] == "init"]
    assert len(acts) == 5 and all(a < b / 2 for a, b in zip(acts[1:], acts))  # activations shrink


def test_normalization_writes_both_parts(compose_cfg, tmp_path):
    overrides = [*QUICK, "trainer.epochs=1", "model.channels=[4]", "extra.norms=[none,batch,layer,instance]",
                 "extra.batch_sizes=[50,100]", "trainer.batch_size=100"]
    run(compose_cfg, "normalization", overrides, tmp_path)
    for name in ("norms", "batch_size"):
        assert_png(tmp_path / f"{name}.png")
    rows = read_csv(tmp_path / "results.csv")
    assert [(r["part"], r["model.norm"]) for r in rows[:4]] == [("norms", n) for n in
                                                               ("none", "batch", "layer", "instance")]
    assert [(r["model.norm"], r["trainer.batch_size"]) for r in rows[4:]] == [
        ("batch", "50"), ("batch", "100"), ("none", "50"), ("none", "100")]
    m = read_json(tmp_path / "batch_size" / "model.norm=batch,trainer.batch_size=50,seed=0" / "metrics.json")
    assert float(rows[4]["test_error"]) == pytest.approx(1 - m["final"]["test_acc"])
    assert all(r["status"] == "completed" for r in rows)


def test_implicit_regularization_grid_and_gd_vs_sgd(compose_cfg, tmp_path):
    overrides = [*QUICK, "trainer.epochs=1", "model.width=16", "extra.lrs=[0.05,0.2]", "extra.batch_sizes=[50,200]",
                 "extra.gd_steps=4", "extra.gd_eval_every=2", "extra.sgd_epochs=1", "extra.sgd_batch_size=40"]
    run(compose_cfg, "implicit_regularization", overrides, tmp_path)
    for name in ("lr_batch", "gd_vs_sgd"):
        assert_png(tmp_path / f"{name}.png")
    rows = read_csv(tmp_path / "results.csv")
    grid = [r for r in rows if r["part"] == "grid"]
    assert [(r["optimizer.lr"], r["trainer.batch_size"]) for r in grid] == [
        ("0.05", "50"), ("0.05", "200"), ("0.2", "50"), ("0.2", "200")]
    cmp = [r for r in rows if r["part"] == "gd_vs_sgd"]
    assert [r["trainer.batch_size"] for r in cmp] == ["full", "40"]
    curves = read_csv(tmp_path / "curves.csv")
    gd = [r for r in curves if r["trainer.batch_size"] == "full"]
    assert [int(r["epoch"]) for r in gd] == [2, 4] and [int(r["step"]) for r in gd] == [2, 4]
    sgd = [r for r in curves if r["part"] == "gd_vs_sgd" and r["trainer.batch_size"] == "40"]
    assert [int(r["step"]) for r in sgd] == [5]  # 200 examples / batch 40
    gd_run = read_json(Path(cmp[0]["run_dir"]) / "metrics.json")
    assert gd_run["epochs"] == 4


def test_cross_validation_folds_choice_and_final_run(compose_cfg, tmp_path):
    overrides = [*QUICK, "model.width=16", "extra.folds=2", "extra.values=[0.0,0.5]"]
    run(compose_cfg, "cross_validation", overrides, tmp_path)
    assert_png(tmp_path / "cv.png")
    folds = read_csv(tmp_path / "folds.csv")
    assert [(r["fold"], r["regularizer.weight_decay.lam"]) for r in folds] == [
        ("0", "0.0"), ("0", "0.5"), ("1", "0.0"), ("1", "0.5")]
    # the validation set of a fold run is its held-out fold: 100 of the 200-example pool
    for fold in (0, 1):
        ck = torch.load(tmp_path / f"fold={fold}" / "regularizer.weight_decay.lam=0.0,seed=0" / "checkpoint.pt",
                        weights_only=False)
        assert (ck["config"]["data"]["folds"], ck["config"]["data"]["fold"]) == (2, fold)
        m = read_json(tmp_path / f"fold={fold}" / "regularizer.weight_decay.lam=0.0,seed=0" / "metrics.json")
        assert m["final"]["val_acc"] * 100 == pytest.approx(round(m["final"]["val_acc"] * 100))
    summary = read_csv(tmp_path / "summary.csv")
    means = {r["value"]: float(r["mean_val_error"]) for r in summary}
    for v in ("0.0", "0.5"):
        assert means[v] == pytest.approx(sum(float(r["val_error"]) for r in folds
                                             if r["regularizer.weight_decay.lam"] == v) / 2)
    chosen = min(means, key=means.get)
    assert [r["value"] for r in summary if r["chosen"] == "True"] == [chosen]
    final = read_csv(tmp_path / "final.csv")
    m = read_json(Path(final[0]["run_dir"]) / "metrics.json")
    assert final[0]["value"] == chosen and "val_acc" not in m["final"]  # trained on the whole pool
    assert float(final[0]["test_error"]) == pytest.approx(1 - m["final"]["test_acc"])


def test_function_fits_curves_and_bands(compose_cfg, tmp_path):
    # trainer.threads left at its default (auto), which this task sets itself
    overrides = ["extra.steps=60", "extra.ensemble=3", "extra.mc_samples=8",
                 "extra.grid=25", "extra.l2=[0.01]", "extra.eval_every=10", "model.width=16"]
    run(compose_cfg, "function_fits", overrides, tmp_path)
    assert torch.get_num_threads() == 1  # a toy problem: auto keeps one thread
    assert_png(tmp_path / "fits.png")
    assert "figures/fits" in tb_images(tmp_path)
    curves = read_csv(tmp_path / "curves.csv")
    assert len(curves) == 25
    for r in curves:
        assert float(r["truth"]) == pytest.approx(math.sin(2 * math.pi * float(r["x"])), abs=1e-6)
        assert float(r["bagging (3 models) std"]) > 0 and float(r["MC dropout (8 samples) std"]) > 0
    methods = [r["method"] for r in read_csv(tmp_path / "summary.csv")]
    assert methods == ["none", "l2 λ=0.01", "dropout p=0.2", "input noise σ=0.05", "early stopping",
                       "bagging (3 models)", "MC dropout (8 samples)"]
    summary = {r["method"]: r for r in read_csv(tmp_path / "summary.csv")}
    es = int(summary["early stopping"]["steps"])
    assert es % 10 == 0 and 10 <= es <= 60
    points = read_csv(tmp_path / "points.csv")
    assert sum(r["split"] == "train" for r in points) == 12
    # the unregularized fit fits the training points at least as well as the strongly decayed one
    assert float(summary["none"]["train_mse"]) <= float(summary["l2 λ=0.01"]["train_mse"]) + 1e-6

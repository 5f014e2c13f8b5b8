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
from regexp.experiments.optimizer_paths import FUNCTIONS, frame, left_frame, path
from regexp.sweep import read_csv
from regexp.tasks import TASKS
from regexp.train.io import read_json

GALLERY = ["optimizer_paths", "init_activation", "normalization", "implicit_regularization",
           "function_fits", "schedules", "optimizer_comparison", "cross_validation",
           "gradient_flow", "soft_weight_sharing", "mnist1d_benchmark", "bayesian_regression",
           "ensemble_theory", "dropout_ensemble"]
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


def grad_bowl(w):  # f(x, y) = x²/20 + y², the course report's test function
    return torch.tensor([w[0] / 10, 2.0 * w[1]], dtype=torch.float64)


def by_hand(name, steps, lr, grad=grad_ellipse, start=(-5.0, -2.0), **h):
    """The textbook updates (shared/reference.md) from ``start``, written out formula by formula."""
    w = torch.tensor(start, dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)   # velocity / first moment
    r = torch.zeros(2, dtype=torch.float64)   # accumulated / averaged squared gradient
    u = torch.zeros(2, dtype=torch.float64)   # AdaDelta's averaged squared update
    out = [w.clone()]
    for t in range(1, steps + 1):
        if name == "nesterov":  # Sutskever: gradient at the look-ahead point w + ρv
            g = grad(w + h["rho"] * v)
            v = h["rho"] * v - lr * g
            w = w + v
            out.append(w + h["rho"] * v)  # torch stores the look-ahead point itself
            continue
        g = grad(w)
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


# The report's settings on the bowl (Saito 2016, fig. 6-8), written out here, not read from the YAML.
REPORT = {
    "sgd": (0.95, {}),
    "momentum": (0.1, {"rho": 0.9}),
    "nesterov": (0.1, {"rho": 0.9}),
    "adagrad": (1.5, {"eps": 1e-7}),
    "rmsprop": (0.1, {"rho": 0.9, "eps": 1e-7}),
    "adadelta": (10.0, {"rho": 0.9, "eps": 1e-6}),
    "adam": (0.3, {"b1": 0.9, "b2": 0.999, "eps": 1e-7}),
}


def bowl_paths(compose_cfg, tmp_path, overrides=()):
    """optimizer -> [[x, y], ...] and the summary rows of a bowl-only run at the defaults."""
    run(compose_cfg, "optimizer_paths", ["extra.functions=[bowl]", "logger.tensorboard=false", *overrides], tmp_path)
    rows = read_csv(tmp_path / "paths.csv")
    paths = {}
    for r in rows:
        paths.setdefault(r["optimizer"], []).append([float(r["x"]), float(r["y"])])
    return paths, read_csv(tmp_path / "summary.csv")


def test_default_bowl_paths_are_the_report_settings_by_hand(compose_cfg, tmp_path):
    paths, summary = bowl_paths(compose_cfg, tmp_path)
    assert list(paths) == list(REPORT)
    # GD η=0.95 from (−7, 2): x1 = −7 − 0.95·(−7/10), y1 = 2 − 0.95·(2·2)
    assert paths["sgd"][1] == pytest.approx([-6.335, -1.8], abs=1e-12)
    for name, (lr, hyper) in REPORT.items():
        want = by_hand(name, 30, lr, grad=grad_bowl, start=(-7.0, 2.0), **hyper)
        assert len(paths[name]) == 31, name  # 30 steps, the start included
        assert paths[name] == [pytest.approx(p, rel=1e-9, abs=1e-12) for p in want.tolist()], name
    for r in summary:  # the distance the README quotes is the last iterate's
        x, y = paths[r["optimizer"]][-1]
        assert float(r["final_distance"]) == pytest.approx(math.hypot(x, y))
        assert r["escaped"] == "False" and r["left_frame_at"] == ""


def test_one_optimizer_setting_override_changes_only_its_path(compose_cfg, tmp_path):
    paths, summary = bowl_paths(compose_cfg, tmp_path, ["extra.steps.bowl=5", "extra.settings.bowl.rmsprop.alpha=0.99"])
    for name, (lr, hyper) in REPORT.items():
        hyper = {**hyper, "rho": 0.99} if name == "rmsprop" else hyper
        want = by_hand(name, 5, lr, grad=grad_bowl, start=(-7.0, 2.0), **hyper)
        assert paths[name] == [pytest.approx(p, rel=1e-9, abs=1e-12) for p in want.tolist()], name
    report_rmsprop = by_hand("rmsprop", 5, 0.1, grad=grad_bowl, start=(-7.0, 2.0), rho=0.9, eps=1e-7)
    assert paths["rmsprop"][1:] != [pytest.approx(p, rel=1e-3) for p in report_rmsprop.tolist()[1:]]
    assert [r["settings"] for r in summary if r["optimizer"] == "rmsprop"] == ["η=0.1, ρ=0.99, ε=1e-07"]


@pytest.mark.parametrize("override,message", [
    ("+extra.settings.bowl.rmsprop.alpah=0.9",
     r"^extra\.settings\.bowl\.rmsprop\.alpah is not a key of optimizer=rmsprop: expected one of "
     r"lr, alpha, eps, momentum, centered$"),
    ("+extra.settings.bowl.rmsprob={lr:0.1}",
     r"^extra\.settings\.bowl\.rmsprob is not a key of .*: expected one of sgd, momentum, .*adam, adamw$"),
    ("+extra.settings.himmelblau={sgd:{lr:0.1}}",
     r"^extra\.settings\.himmelblau is not a key of extra\.settings: expected one of bowl, ellipse, "
     r"saddle, rosenbrock$"),
    ("extra.settings.bowl.rmsprop.alpha=1.5",
     r"^extra\.settings\.bowl\.rmsprop\.alpha=1\.5 is invalid: expected a number in \[0, 1\)$"),
    ("extra.settings.bowl.sgd.lr=fast",
     r"^extra\.settings\.bowl\.sgd\.lr='fast' is invalid: expected a value of the type"),
    ("extra.optimizers=[sgd,rmsprob]", r"^extra\.optimizers='rmsprob' is invalid: expected values among sgd"),
])
def test_optimizer_paths_refuses_bad_settings_naming_the_key(compose_cfg, tmp_path, override, message):
    from regexp.errors import ConfigError

    cfg = compose_cfg(["+experiment=optimizer_paths", "extra.functions=[bowl]", override])
    with pytest.raises(ConfigError, match=message):
        TASKS["optimizer_paths"](cfg, tmp_path, [override], False)
    assert not (tmp_path / "paths.png").exists()


def test_optimizer_paths_yaml_states_the_schema_defaults(compose_cfg):
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from regexp.experiments.optimizer_paths import Settings

    cfg = compose_cfg(["+experiment=optimizer_paths"])
    assert OmegaConf.to_container(cfg.extra) == asdict(Settings())


def test_paths_leaving_the_frame_end_on_its_edge():
    box = (-2.0, 2.0, -1.0, 1.0)
    p = torch.tensor([[0.0, 0.0], [1.0, 0.5], [3.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    # the segment (1, 0.5) -> (3, 0.5) crosses x = 2 halfway
    assert left_frame(p, box) == (2, (2.0, 0.5))
    # (0, 0) -> (0, 3) -> the top edge, a third of the way; a jump to NaN ends at the last point
    assert left_frame(torch.tensor([[0.0, 0.0], [0.0, 3.0]]), box) == (1, (0.0, 1.0))
    assert left_frame(torch.tensor([[0.5, 0.5], [math.nan, 0.0]]), box) == (1, (0.5, 0.5))
    assert left_frame(p[:2], box) is None
    # the frame takes in a small overshoot whole, a runaway path up to half the box's span
    assert frame(box, [p[:2], torch.tensor([[2.5, -1.2]], dtype=torch.float64)]) == (-2.0, 2.5, -1.2, 1.0)
    assert frame(box, [torch.tensor([[100.0, -50.0], [math.inf, 0.0]])]) == (-2.0, 4.0, -2.0, 1.0)


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
                         weights_only=True)["config"]
        assert cfg["optimizer"]["name"] == name and cfg["optimizer"]["lr"] == pytest.approx(lr)


def test_init_activation_shows_vanishing_gradients(compose_cfg, tmp_path):
    overrides = [*QUICK, "trainer.epochs=1", "model.depth=5", "model.width=32", "extra.activations=[sigmoid,relu]",
                 "extra.inits=[normal,he]", "extra.init_stds=[0.01]", "extra.norms=[none,batch]",
                 "extra.probe_size=128"]
    run(compose_cfg, "init_activation", overrides, tmp_path)
    for name in ("histograms", "accuracy", "gradients", "activations", "grid"):
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
    # relu is unbounded: no saturation, and each layer's histogram spans its values at init and
    # trained alike (one set of bins), every probe × width activation counted once
    relu = [r for r in layers if r["model.activation"] == "relu" and r["act_std"] != ""]
    assert len(relu) == 2 * 2 * 2 * 5 and all(r["saturated"] == "" for r in relu)
    hists = [r for r in read_csv(tmp_path / "histograms.csv") if r["model.activation"] == "relu"]
    assert len(hists) == len(relu)
    spans = {}
    for r in hists:
        spans.setdefault((r["init_label"], r["model.norm"], r["layer"]), set()).add((r["lo"], r["hi"]))
        assert sum(int(r[f"count_{b}"]) for b in range(41)) == 128 * 32
    assert len(spans) == 2 * 2 * 5 and all(len(v) == 1 for v in spans.values())


def test_init_activation_histograms(compose_cfg, tmp_path):
    """Every run × layer × (init, trained) has a histogram of all probe × width activations, and
    the sigmoid cases show what Glorot & Bengio (2010, fig. 6) show: N(0, 1) saturates, Xavier
    does not, N(0, 0.01²) collapses onto 0.5."""
    probe, width, depth, bins = 96, 32, 3, 11
    overrides = [*QUICK, "trainer.epochs=1", f"model.depth={depth}", f"model.width={width}",
                 "extra.activations=[sigmoid]", "extra.inits=[normal,xavier]", "extra.init_stds=[1.0,0.01]",
                 "extra.norms=[none]", f"extra.probe_size={probe}", f"extra.bins={bins}"]
    run(compose_cfg, "init_activation", overrides, tmp_path)
    assert "figures/histograms" in tb_images(tmp_path)
    results = read_csv(tmp_path / "results.csv")
    cases = {(r["model.activation"], r["init_label"]) for r in results}
    assert cases == {("sigmoid", i) for i in ("normal(1)", "normal(0.01)", "xavier")}
    hists = read_csv(tmp_path / "histograms.csv")
    keys = [(r["model.activation"], r["init_label"], r["when"], int(r["layer"])) for r in hists]
    assert sorted(keys) == sorted((a, i, w, k) for a, i in cases for w in ("init", "trained")
                                  for k in range(1, depth + 1))
    for r in hists:
        counts = [int(r[f"count_{b}"]) for b in range(bins)]
        assert f"count_{bins}" not in r and sum(counts) == probe * width
        assert (float(r["lo"]), float(r["hi"])) == (0.0, 1.0)  # sigmoid's range: saturation shows

    layers = [r for r in read_csv(tmp_path / "layers.csv") if r["when"] == "init" and r["act_std"] != ""]

    def stat(init, key):
        chosen = sorted((r for r in layers if r["init_label"] == init), key=lambda r: int(r["layer"]))
        return [float(r[key]) for r in chosen]

    big, xavier, small = (stat(i, "saturated") for i in ("normal(1)", "xavier", "normal(0.01)"))
    assert len(big) == depth
    # N(0, 1): the first pre-activation has std ≈ ‖x‖ ≈ √40, so ≈ half its sigmoids sit within
    # 0.01 of 0 or 1 (|z| > 4.6); Xavier's std ≈ 1 puts that at 4.4 standard deviations
    assert big[0] > 0.3 and all(b > x for b, x in zip(big, xavier)) and max(xavier) < 0.01
    assert max(small) == 0.0
    # N(0, 0.01²): |σ(z) − 1/2| ≤ |z|/4 with z tiny, so every layer collapses onto 0.5
    assert all(v < 0.03 for v in stat("normal(0.01)", "act_std"))
    assert all(v < 0.3 * x for v, x in zip(stat("normal(0.01)", "act_std"), stat("xavier", "act_std")))


@pytest.mark.parametrize("override, message", [
    ("extra.init_stds=[1.0,0]", r"extra\.init_stds=\[1\.0, 0\.0\] is invalid: expected a non-empty list of numbers"),
    ("extra.inits=[glorot]", r"extra\.inits='glorot' is invalid: expected values among default, xavier, xavier_normal"),
    ("extra.bins=1", r"extra\.bins=1 is invalid: expected an integer >= 2"),
])
def test_init_activation_rejects_bad_settings(compose_cfg, tmp_path, override, message):
    from regexp.errors import ConfigError

    cfg = compose_cfg(["+experiment=init_activation", override])
    with pytest.raises(ConfigError, match=message):
        TASKS["init_activation"](cfg, tmp_path, [], False)
    assert not list(tmp_path.iterdir())  # refused before any run


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


def test_implicit_regularization_equal_lr_steps_budgets_and_the_penalized_gd_runs(compose_cfg, tmp_path):
    # 200 examples: batch 50 and 200 take 4 and 1 steps per epoch; lr x steps = 4 in every cell
    overrides = [*QUICK, "model.width=16", "extra.lrs=[0.5,1.0]", "extra.batch_sizes=[50,200]", "extra.budget=4",
                 "extra.gd_lr=0.5", "extra.gd_small_lr=0.25", "extra.gd_time=1", "extra.gd_evals=2"]
    defaults = compose_cfg(["+experiment=implicit_regularization"]).data
    assert defaults.val_fraction == 0 and defaults.n_train is None and defaults.n_test == 4000  # the book's split
    run(compose_cfg, "implicit_regularization", [*overrides, "data.n_test=200"], tmp_path)
    for name in ("lr_batch", "gd_penalty"):
        assert_png(tmp_path / f"{name}.png")
    rows = read_csv(tmp_path / "results.csv")
    grid = [r for r in rows if r["part"] == "grid"]
    assert [(r["optimizer.lr"], r["trainer.batch_size"], r["steps"], r["trainer.epochs"]) for r in grid] == [
        ("0.5", "50", "8", "2"), ("0.5", "200", "8", "8"), ("1.0", "50", "4", "1"), ("1.0", "200", "4", "4")]
    for r in grid:
        assert float(r["lr_x_steps"]) == 4.0
        assert read_json(Path(r["run_dir"]) / "metrics.json")["epochs"] == int(r["trainer.epochs"])
        for key in ("train_error", "train_loss", "test_error"):
            assert 0 <= float(r[key]) < 10, key
    gd = [r for r in rows if r["part"] == "gd_penalty"]
    assert [(r["optimizer.lr"], r["steps"], r["lr_x_steps"]) for r in gd] == [
        ("0.5", "2", "1.0"), ("0.25", "4", "1.0"), ("0.25", "4", "1.0")]
    assert all(r["trainer.batch_size"] == "full" for r in gd)
    # the penalty of the third run is the difference of the two steps' implicit terms, (0.5 - 0.25)/4
    assert gd[2]["regularizer.gradient_norm_penalty.lam"] == "0.0625" and gd[1].get(
        "regularizer.gradient_norm_penalty.lam", "") == ""
    pen = read_json(Path(gd[2]["run_dir"]) / "metrics.json")["config"]["regularizer"]
    assert pen == {"gradient_norm_penalty": {"lam": 0.0625, "mode": "full", "micro_batches": 1}}
    # distances to the large step's final weights, recomputed from the saved models
    saved = [torch.load(Path(r["run_dir"]) / "model.pt", weights_only=True) for r in gd]
    weights = [torch.cat([v.flatten() for v in state.values()]) for state in saved]
    assert gd[0]["distance_to_large"] == ""
    for r, w in zip(gd[1:], weights[1:]):
        assert float(r["distance_to_large"]) == pytest.approx(float((w - weights[0]).norm()), rel=1e-5)
        assert float(r["grad_norm_sq"]) > 0
    curves = read_csv(tmp_path / "curves.csv")
    small = [r for r in curves if r["part"] == "gd_penalty" and r["variant"] == gd[1]["variant"]]
    assert [(int(r["step"]), float(r["lr_x_step"])) for r in small] == [(2, 0.5), (4, 1.0)]
    cell = [r for r in curves
            if r["part"] == "grid" and r["optimizer.lr"] == "0.5" and r["trainer.batch_size"] == "200"]
    assert [(int(r["step"]), float(r["lr_x_step"])) for r in cell] == [(e, 0.5 * e) for e in range(1, 9)]


def test_implicit_regularization_budget_rounds_to_whole_epochs_and_bad_settings_are_refused(compose_cfg, tmp_path):
    from regexp.errors import ConfigError
    from regexp.experiments.implicit_regularization import grid_steps

    # the defaults' batch sizes divide 4000, so every lr × steps is exactly the budget
    for lr in (0.1, 0.2, 0.4):
        for b in (16, 80, 400):
            assert grid_steps(lr, b, 4000, 1000)["steps"] * lr == pytest.approx(1000)
    # batch 64: 63 steps per epoch (the last one of 32 examples); 10000 steps round to 159 epochs
    assert grid_steps(0.1, 64, 4000, 1000) == {"epochs": 159, "steps_per_epoch": 63, "steps": 10017}
    for bad, key in (("extra.gd_small_lr=0.3", "extra.gd_small_lr"), ("extra.budget=0", "extra.budget"),
                     ("optimizer=adam", "optimizer.name")):
        cfg = compose_cfg(["+experiment=implicit_regularization", bad])
        with pytest.raises(ConfigError, match=f"^{key}="):
            TASKS["implicit_regularization"](cfg, tmp_path, [bad], False)


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
                        weights_only=True)
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

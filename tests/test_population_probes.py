"""Probes and SAM in a population, batched across members, against lone runs and exact maths.

Stated tolerance (float32 runs): a member's probe values equal its lone run's within
|a - b| <= 1e-6 + 1e-4·|b|. The batched products only change the summation order; the
loss differences (sharpness) lose digits to cancellation, hence the absolute term. In float64
(the padding and norm tests, on the same weights) the values agree to 1e-9. Normalized members
(batch, layer, instance norm) train with momentum where Adam's normalized step would magnify
the rounding noise of the bias before a per-channel norm (tests/test_population_cnn_norm.py);
their parameters and running statistics end within |a - b| <= 1e-5 + 1e-4·|b| of their lone
runs' (as tests/test_population.py) and equal, bit for bit, a population's trained without probes.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import read_scalars
from regexp.data import load_data
from regexp.models import build_model
from regexp.models.mlp import MLP
from regexp.population import train_population, use_population
from regexp.population.stacked_mlp import StackedMLP
from regexp.probes.base import ProbeInputs
from regexp.probes.hessian import HessianProbe, hvp_operator
from regexp.probes.sharpness import SharpnessProbe
from regexp.sweep import point_config, point_name
from regexp.train.trainer import seed_everything, train
from test_optim_sam import by_hand

TINY = ["trainer.epochs=2", "trainer.progress=false", "trainer.threads=1", "data.n_train=200",
        "logger.histogram_every=0", "trainer.batch_size=50"]
PROBES = ["probe=[hessian,sharpness]", "probe.every=1", "probe.batch_size=64", "probe.hessian.lanczos_steps=6",
          "probe.hessian.trace_samples=2", "probe.sharpness.samples=2", "probe.sharpness.noise_microbatches=4"]
ATOL, RTOL = 1e-6, 1e-4


def _runs(compose_cfg, tmp_path, overrides, points):
    base = compose_cfg(TINY + overrides)
    assert use_population(base, points)  # auto picks the population: nothing is refused
    pop = train_population(base, points, tmp_path / "pop")
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    return pop, lone


def test_member_probes_equal_lone_run_probes(compose_cfg, tmp_path):
    # tanh: a padded unit's incoming and outgoing weights are coupled in the padded Hessian,
    # so the narrow member (width 12 padded to 16) is right only if padding is masked out
    points = [{"model.width": 12, "seed": 0}, {"model.width": 16, "seed": 1}]
    pop, lone = _runs(compose_cfg, tmp_path, PROBES + ["model.activation=tanh"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_probes(tmp_path, p, a, b)
        name = point_name(p)
        # the checkpoint carries the same probe history and the same generator position
        cp, cl = (torch.load(tmp_path / d / name / "checkpoint.pt", weights_only=True) for d in ("pop", "lone"))
        assert torch.equal(cp["probes"]["generator"], cl["probes"]["generator"])
        assert [r["epoch"] for r in cp["probe_history"]] == [r["epoch"] for r in cl["probe_history"]] == [1]


def _assert_same_probes(tmp_path, p, a, b, epochs=(1, 2)):
    """Member ``a`` of point ``p`` measured what its lone run ``b`` measured, at ``epochs``:
    ``probe_history`` and ``probes`` in metrics.json, and the ``probe/*`` TensorBoard scalars."""
    epochs = list(epochs)
    assert [r["epoch"] for r in a["probe_history"]] == [r["epoch"] for r in b["probe_history"]] == epochs
    for ra, rb in zip(a["probe_history"], b["probe_history"]):
        assert ra.keys() == rb.keys()
        for k in rb:
            assert ra[k] == pytest.approx(rb[k], rel=RTOL, abs=ATOL), (p, ra["epoch"], k)
    assert a["probes"] == {k: v for k, v in a["probe_history"][-1].items() if k != "epoch"}
    name = point_name(p)
    saved = json.loads((tmp_path / "pop" / name / "metrics.json").read_text())
    keys = list(saved)  # in the lone run's order
    assert keys == list(b) and keys[keys.index("config"):][:3] == ["config", "probes", "probe_history"]
    assert saved["probe_history"] == a["probe_history"]
    sp, sl = read_scalars(tmp_path / "pop" / name), read_scalars(tmp_path / "lone" / name)
    tags = {t for t in sl if t.startswith("probe/")}
    assert tags and {t for t in sp if t.startswith("probe/")} == tags
    for t in tags:
        assert [s for s, _ in sp[t]] == [s for s, _ in sl[t]] == epochs, t
        assert [v for _, v in sp[t]] == pytest.approx([v for _, v in sl[t]], rel=1e-3, abs=ATOL), t
    assert (tmp_path / "pop" / name / "hessian_density.png").stat().st_size > 1000


# Normalized members, one of them padded: an MLP's hidden width 12 in a bucket of 16 (or its
# list of widths, layer by layer), a CNN's channels per stage. Batch norm: the lone probes run in eval mode on the running statistics
# and leave them as they are, so a member's statistics after training (model.pt) must be its
# lone run's, and num_batches_tracked counts the training steps only.
NORMED = {
    "mlp-batch": (["model.norm=batch", "model.activation=tanh", "optimizer=momentum"],
                  [{"model.width": 12}, {"model.width": 16}]),
    "mlp-layer": (["model.norm=layer", "model.activation=tanh"], [{"model.width": 12}, {"model.width": 16}]),
    # uneven widths, each layer padded to its widest, and skips ([40, 20, 20]: two, [32, 16, 16]: one)
    "mlp-widths-batch-residual": (["model.norm=batch", "model.residual=true", "model.activation=tanh",
                                   "optimizer=momentum"],
                                  [{"model.widths": [40, 20, 20]}, {"model.widths": [32, 16, 16]}]),
    "cnn-batch": (["model=cnn", "model.norm=batch", "model.kernel_size=3", "model.activation=tanh",
                   "optimizer=momentum"],
                  [{"model.channels": [3, 4]}, {"model.channels": [4, 5]}]),
    "cnn-instance": (["model=cnn", "model.norm=instance", "model.kernel_size=3", "model.pool=avg",
                      "optimizer=momentum"],
                     [{"model.channels": [3, 4]}, {"model.channels": [4, 5]}]),
    "cnn-layer": (["model=cnn", "model.norm=layer", "model.kernel_size=3", "model.activation=sigmoid"],
                  [{"model.channels": [3, 4]}, {"model.channels": [4, 5]}]),
}


@pytest.mark.parametrize("case", list(NORMED))
def test_normalized_member_probes_equal_lone_run_probes(compose_cfg, tmp_path, case):
    overrides, widths = NORMED[case]
    points = [{**w, "seed": s} for s, w in enumerate(widths)]
    pop, lone = _runs(compose_cfg, tmp_path, PROBES + overrides, points)
    train_population(compose_cfg(TINY + overrides), points, tmp_path / "plain")
    for p, a, b in zip(points, pop, lone):
        name = point_name(p)
        wa, wb, wp = (torch.load(tmp_path / d / name / "model.pt", weights_only=True) for d in ("pop", "lone", "plain"))
        assert wa.keys() == wb.keys() == wp.keys()
        for k in wb:
            # the probes leave the training (batch norm's running statistics included) exactly as
            # without them, and the member ends where its lone run does
            assert torch.equal(wa[k], wp[k]), k
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)
        if "batch" in case:
            seen = [k for k in wb if k.endswith("num_batches_tracked")]
            assert seen and all(int(wa[k]) == 2 * 200 // 50 for k in seen)
            assert any(k.endswith("running_mean") for k in wb)
        _assert_same_probes(tmp_path, p, a, b)


def test_uneven_width_member_probes_equal_lone_run_probes(compose_cfg, tmp_path):
    # model.widths: the narrower member is padded per layer (6 to 8, then 5 to 6)
    points = [{"model.widths": [6, 5], "seed": 0}, {"model.widths": [8, 6], "seed": 1}]
    hessian = ["probe=[hessian]"] + [o for o in PROBES if o.startswith(("probe.every", "probe.batch", "probe.hessian"))]
    pop, lone = _runs(compose_cfg, tmp_path, hessian + ["model.activation=tanh", "trainer.epochs=1"], points)
    for a, b in zip(pop, lone):
        for ra, rb in zip(a["probe_history"], b["probe_history"], strict=True):
            assert ra == pytest.approx(rb, rel=RTOL, abs=ATOL)


def _two_members(dtype=torch.float64):
    """A 6-3-4 and a 6-5-4 tanh MLP stacked (the first padded to width 5) with their data."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        models = [MLP(6, 4, w, 1, "tanh") for w in (3, 5)]
        with torch.no_grad():  # biases away from 0, so the padded block of the Hessian is not 0 by chance
            for mdl in models:
                for q in mdl.parameters():
                    q.add_(0.3 * torch.randn_like(q))
        net = StackedMLP(models, [3, 5], 5, "tanh", torch.device("cpu"))
    finally:
        torch.set_default_dtype(old)
    x, y = torch.randn(2, 40, 6, dtype=dtype), torch.randint(0, 4, (2, 40))
    return models, net, x, y


def _stacked_inputs(net, x, y, masks="auto"):
    return ProbeInputs(net.forward, net.params, x, y, x, y, 16, members=2, batched=True,
                       masks=net.param_masks() if masks == "auto" else masks,
                       is_weight=[w for _, _, w in net.named_params()])


def test_padded_member_probes_ignore_padding():
    models, net, x, y = _two_members()
    inputs = _stacked_inputs(net, x, y)
    # the narrow member's operator, restricted to its real entries, is its lone exact Hessian
    mask = inputs.axis.mask
    assert inputs.axis.dims == [sum(q.numel() for q in m.parameters()) for m in models]
    hv = hvp_operator(inputs.loss(), inputs.params, 2, mask)
    lone = models[0]
    names = [n for n, _ in lone.named_parameters()]
    shapes = [q.shape for q in lone.parameters()]

    def loss_of(w):
        chunks, i = [], 0
        for s in shapes:
            chunks.append(w[i:i + math.prod(s)].reshape(s))
            i += math.prod(s)
        return F.cross_entropy(torch.func.functional_call(lone, dict(zip(names, chunks)), (x[0],)), y[0])

    w0 = torch.cat([q.detach().reshape(-1) for q in lone.parameters()])
    H = torch.autograd.functional.hessian(loss_of, w0)
    V = torch.randn(2, mask.shape[1], dtype=torch.float64) * mask
    torch.testing.assert_close(hv(V)[0, mask[0]], H @ V[0, mask[0]], rtol=1e-10, atol=1e-12)
    assert torch.equal(hv(V)[0, ~mask[0]], torch.zeros(int((~mask[0]).sum()), dtype=torch.float64))
    # unmasked, the padded block (tanh'(0) = 1 couples a padded unit's in- and out-weights) leaks in
    unmasked = hvp_operator(inputs.loss(), inputs.params, 2)(torch.ones_like(V))
    assert unmasked[0, ~mask[0]].abs().max() > 1e-3
    # every probe value of each member equals its lone model's (the same draws, in the same order)
    for probe in (HessianProbe(HessianProbe.Config(lanczos_steps=40, trace_samples=5, top_k=3)),
                  SharpnessProbe(SharpnessProbe.Config(samples=3, noise_microbatches=4))):
        got = probe.measure(inputs, [torch.Generator().manual_seed(s) for s in (5, 6)])
        last = getattr(probe, "last", None)
        for m, (mdl, g) in enumerate(zip(models, got)):
            alone = ProbeInputs(mdl, list(mdl.parameters()), x[m], y[m], x[m], y[m], 16)
            want = probe.measure(alone, [torch.Generator().manual_seed(5 + m)])[0]
            assert g.keys() == want.keys()
            for k in want:
                assert g[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (m, k)
        if isinstance(probe, HessianProbe):
            # 40 steps exhaust the narrow member's 37 dimensions (Lanczos stops on an invariant
            # space, one Ritz value per distinct eigenvalue): every Ritz value is an eigenvalue of
            # its lone Hessian, the extremes included, none of the padded block's
            theta, exact = last[0].runs[0].eig()[0], torch.linalg.eigvalsh(H)
            assert float((theta[:, None] - exact[None]).abs().min(1).values.max()) < 1e-9
            torch.testing.assert_close(theta[[0, -1]], exact[[0, -1]], rtol=0, atol=1e-9)


def _normed_members(kind: str, norm: str):
    """Two float64 members of one bucket with ``norm``, the first padded, their weights and
    batch norm's running statistics moved away from their start (so eval mode's statistics are
    not the batch's), stacked; with the input shape of one example."""
    from regexp.models.cnn import CNN
    from regexp.population.compat import bucket_width
    from regexp.population.stacked_cnn import StackedCNN

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if kind == "mlp":
            shape, sizes = (6,), [3, 5]
            models = [MLP(6, 4, w, 2, "tanh", norm) for w in sizes]
        else:
            shape, sizes = (2, 12), [(3, 4), (4, 5)]
            models = [CNN(shape, 4, list(c), 3, "max", norm, "tanh", 1, None, "flatten") for c in sizes]
        with torch.no_grad():
            for mdl in models:
                for q in mdl.parameters():
                    q.add_(0.3 * torch.randn_like(q))
                for n, t in mdl.named_buffers():
                    if n.endswith("running_mean"):
                        t.copy_(0.5 * torch.randn_like(t))
                    elif n.endswith("running_var"):
                        t.copy_(0.5 + torch.rand_like(t))
        net = (StackedMLP(models, sizes, 5, "tanh", torch.device("cpu")) if kind == "mlp" else
               StackedCNN(models, sizes, bucket_width(sizes), shape, torch.device("cpu")))
    finally:
        torch.set_default_dtype(old)
    return models, net, shape


@pytest.mark.parametrize("kind,norm", [("mlp", "batch"), ("mlp", "layer"), ("cnn", "batch"), ("cnn", "layer"),
                                       ("cnn", "instance")])
def test_normalized_member_probes_equal_lone_eval_mode_probes(kind, norm):
    # on the same weights, in float64: every probe value of each member equals its lone model's
    # in eval mode (batch norm on its running statistics), with the norms' scales and shifts in
    # the parameter set, and the stacked running statistics stay exactly as they were
    models, net, shape = _normed_members(kind, norm)
    d = math.prod(shape)
    x, y = torch.randn(2, 40, d, dtype=torch.float64), torch.randint(0, 4, (2, 40))
    inputs = ProbeInputs(net.eval_forward, net.params, x, y, x, y, 16, members=2, batched=True,
                         masks=net.param_masks(), is_weight=[w for _, _, w in net.named_params()])
    assert inputs.axis.dims == [sum(q.numel() for q in m.parameters()) for m in models]
    before = [t.clone() for t in net.state_tensors]
    for probe in (HessianProbe(HessianProbe.Config(lanczos_steps=12, trace_samples=3, top_k=3)),
                  SharpnessProbe(SharpnessProbe.Config(samples=3, noise_microbatches=4))):
        got = probe.measure(inputs, [torch.Generator().manual_seed(s) for s in (5, 6)])
        for m, (mdl, g) in enumerate(zip(models, got)):
            mdl.eval()
            alone = ProbeInputs(lambda z, mdl=mdl: mdl(z.view(-1, *shape)), list(mdl.parameters()),
                                x[m], y[m], x[m], y[m], 16)
            want = probe.measure(alone, [torch.Generator().manual_seed(5 + m)])[0]
            assert g.keys() == want.keys()
            for k in want:
                assert g[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (m, k)
    for t, b in zip(net.state_tensors, before):
        assert torch.equal(t, b)
    # in training mode (batch statistics) batch norm's members would measure other values
    if norm == "batch":
        train_mode = ProbeInputs(net.forward, net.params, x, y, x, y, 16, members=2, batched=True,
                                 masks=net.param_masks(), is_weight=inputs.is_weight)
        with torch.no_grad():
            assert abs(float(train_mode.loss()[0]) - float(inputs.loss()[0])) > 1e-3


@pytest.mark.parametrize("adaptive", [False, True])
def test_population_sam_step_equals_hand_written_update(compose_cfg, tmp_path, adaptive):
    # one full-batch step per member, two widths (one padded), one radius each
    base = compose_cfg(["optimizer=sam", "optimizer.lr=0.5", f"optimizer.adaptive={str(adaptive).lower()}",
                        "data.n_train=200", "trainer.batch_size=full", "trainer.epochs=1", "trainer.progress=false",
                        "trainer.threads=1", "logger.histogram_every=0", "data.val_fraction=0"])
    points = [{"model.width": 12, "optimizer.rho": 0.2}, {"model.width": 16, "optimizer.rho": 0.05}]
    train_population(base, points, tmp_path)
    for p in points:
        cfg = point_config(base, p)
        data = load_data(cfg.data, cfg.seed)
        seed_everything(cfg.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        x, y = data.split("train")
        expected = by_hand(model, x, y, p["optimizer.rho"], adaptive, 0.01,
                           lambda w, g: [wi - 0.5 * gi for wi, gi in zip(w, g)])
        got = torch.load(tmp_path / point_name(p) / "model.pt", weights_only=True)
        for (name, _), e in zip(model.named_parameters(), expected):
            torch.testing.assert_close(got[name], e.to(got[name].dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [["regularizer=[input_noise,dropout]", "regularizer.dropout.p=0.2"],
                                   ["model.activation=tanh", "regularizer=[weight_decay]", "optimizer.base=adam",
                                    "optimizer.lr=0.01"],
                                   ["regularizer=[input_noise,weight_noise,dropout]", "regularizer.dropout.p=0.2",
                                    "regularizer.weight_noise.sigma=0.05"],
                                   ["model.activation=tanh", "regularizer=[dropconnect,weight_noise,dropout]",
                                    "regularizer.dropout.p=0.1", "regularizer.weight_noise.sigma=0.05",
                                    "regularizer.dropconnect.p=0.2", "regularizer.dropconnect.include_head=true"]])
def test_sam_members_match_lone_sam_runs(compose_cfg, tmp_path, extra):
    # relu without a penalty takes the hand-written backward (with input noise drawn once per
    # batch and dropout masks drawn again for the second pass, as a lone run draws them);
    # tanh + weight decay takes autograd. Weight noise (hand-written backward) and DropConnect
    # before weight noise (autograd): the second pass draws both again, layer by layer between
    # the dropout masks, on the ascended weights
    over = ["optimizer=sam", "optimizer.base=momentum", "optimizer.momentum=0.9", "optimizer.lr=0.05", *extra]
    points = [{"model.width": 12, "optimizer.rho": 0.1, "seed": 0}, {"model.width": 16, "optimizer.rho": 0.02, "seed": 1}]
    pop, lone = _runs(compose_cfg, tmp_path, over, points)
    for p, a, b in zip(points, pop, lone):
        name = point_name(p)
        wa, wb = (torch.load(tmp_path / d / name / "model.pt", weights_only=True) for d in ("pop", "lone"))
        assert wa.keys() == wb.keys()
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
        for ra, rb in zip(a["history"], b["history"]):
            assert ra == pytest.approx(rb, rel=1e-4, abs=1e-6)
    # the radius matters: without it (ρ → 0) a member ends outside that tolerance
    train(point_config(compose_cfg(TINY + over), {**points[0], "optimizer.rho": 1e-9}), tmp_path / "plain")
    wp = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    wa = torch.load(tmp_path / "pop" / point_name(points[0]) / "model.pt", weights_only=True)
    assert max(float(((wp[k] - wa[k]).abs() - 1e-4 * wa[k].abs()).max()) for k in wa) > 1e-5


def test_interrupted_population_resumes_to_the_same_probes(compose_cfg, tmp_path, monkeypatch):
    # each member's probe generator and history travel in its checkpoint: the resumed members
    # measure exactly what the uninterrupted population measures
    assert_resumes_to_the_same_probes(compose_cfg(TINY + PROBES + ["trainer.epochs=3", "trainer.batch_size=100"]),
                                      tmp_path, monkeypatch)


def assert_resumes_to_the_same_probes(base, tmp_path, monkeypatch) -> None:
    """Two members interrupted inside epoch 2 of 3 resume to the uninterrupted probe history."""
    from conftest import StopAfter
    import regexp.population.engine as engine

    points = [{"model.width": 12, "seed": 0}, {"model.width": 16, "seed": 1}]
    whole = train_population(base, points, tmp_path / "whole")
    # 2 steps an epoch and one more check after its end: the 4th check is inside epoch 2
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(3))
    stopped = train_population(base, points, tmp_path / "cut")
    monkeypatch.undo()
    assert [[r["epoch"] for r in m["probe_history"]] for m in stopped] == [[1], [1]]
    resumed = train_population(base, points, tmp_path / "cut")
    for a, b in zip(resumed, whole):
        assert [r["epoch"] for r in a["probe_history"]] == [1, 2, 3]
        assert a["probe_history"] == b["probe_history"] and a["probes"] == b["probes"]

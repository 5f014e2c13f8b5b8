"""Ensembles that start from, or are pulled toward, another run's weights in a population:
``transfer`` and ``parameter_tying`` (reference mode) beside ``ensemble``.

The former per-model loop attached both to the Ensemble module, whose parameters are named
``members.k.*``, and matched a saved model.pt to them by name and shape, so (and so here):

- ``transfer``: model k starts from model k of an ensemble run's model.pt (a model the source lacks
  keeps its seed's start); ``freeze`` leaves each model's head alone trainable;
- ``parameter_tying``: λ·Σₖ Σ_tied ‖wₖ − w_ref,k‖², model k pulled toward the reference's model k
  (a model the reference lacks is untied);
- a plain run's model.pt shares no name with an Ensemble: refused, as the former loop refused it
  (its message now says why), and joint tying (its partner one plain model) is refused in one line.

The reference is tests/test_population_ensemble.py's plain-torch ensemble, started from the source's
tensors (the frozen ones without a gradient), with the tying term written out. Tolerances as that
file states them (float32, only the summation order inside the batched products differs): every
parameter within |a - b| <= 1e-5 + 1e-4·|b| of the reference after 30 steps, the test loss a relative
1e-4; a member of a population of three against its population of one alike, every metric a relative
1e-4; a resumed run equal to the uninterrupted one exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch

from test_population_ensemble import (ATOL, BASE, RTOL, _components, assert_each_equals_alone,
                                      assert_resumes_exactly, reference_run)
from regexp.errors import ConfigError
from regexp.train.trainer import train


def _source(compose_cfg, out: Path, k: int, seed: int, width: int = 24) -> List[List[torch.Tensor]]:
    """An ensemble run of k models trained one epoch into ``out``; its models' tensors."""
    cfg = compose_cfg(BASE + ["trainer.epochs=1", "regularizer=[ensemble]", f"regularizer.ensemble.components={k}",
                              "optimizer=sgd", "optimizer.lr=0.1", f"seed={seed}", f"model.width={width}"])
    assert train(cfg, out)["status"] == "completed"
    return _components(torch.load(out / "model.pt", weights_only=True), k)


def _start(source: List[List[torch.Tensor]], freeze: bool):
    def start(nets) -> None:
        with torch.no_grad():
            for net, tensors in zip(nets, source):  # model k from the source's model k
                for p, t in zip(net.parameters(), tensors):
                    p.copy_(t)
        if freeze:  # every model's hidden layers; its head (the last Linear) trains
            for net in nets:
                for p in net[:-1].parameters():
                    p.requires_grad_(False)
    return start


def _tying(lam: float, source: List[List[torch.Tensor]], weights_only: bool):
    def penalty(nets, x, y, loss):
        return lam * sum((p - r).pow(2).sum() for net, tensors in zip(nets, source)
                         for p, r in zip(net.parameters(), tensors) if p.dim() >= 2 or not weights_only)
    return penalty


# (ensemble's K, overrides, reference hooks from the source's two models)
CASES = {
    # three models from a two-model run: the third keeps its seed's start, all heads alone train
    "transfer-frozen": (3, lambda src: ["regularizer=[ensemble,transfer]", f"regularizer.transfer.run_dir={src}"],
                        lambda s: dict(start=_start(s, True))),
    "tying": (2, lambda src: ["regularizer=[ensemble,parameter_tying]", f"regularizer.parameter_tying.run_dir={src}",
                              "regularizer.parameter_tying.lam=0.1",
                              "regularizer.parameter_tying.exclude_bias_and_norm=true"],
              lambda s: dict(penalty=_tying(0.1, s, True))),
    # L2-SP: start at the source and stay near it; the third model is neither loaded nor tied
    "transfer-tying": (3, lambda src: ["regularizer=[ensemble,transfer,parameter_tying]",
                                       f"regularizer.transfer.run_dir={src}", "regularizer.transfer.freeze=false",
                                       f"regularizer.parameter_tying.run_dir={src}",
                                       "regularizer.parameter_tying.lam=0.05"],
                       lambda s: dict(start=_start(s, False), penalty=_tying(0.05, s, False))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_ensemble_from_another_run_trained_alone_equals_plain_torch(compose_cfg, tmp_path, case):
    k, overrides, hooks = CASES[case]
    source = _source(compose_cfg, tmp_path / "src", 2, seed=9)
    cfg = compose_cfg(BASE + ["trainer.epochs=3", f"regularizer.ensemble.components={k}", "optimizer=adam",
                              "optimizer.lr=0.003", "seed=4"] + overrides(tmp_path / "src"))
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["engine"] == "population"
    hooks = hooks(source)
    init, nets, test_loss, test_acc = reference_run(cfg, **hooks)
    started = _components(torch.load(tmp_path / "run" / "init_model.pt", weights_only=True), k)
    for a, b in zip(started, init):
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    final = _components(torch.load(tmp_path / "run" / "model.pt", weights_only=True), k)
    for j, (a, net) in enumerate(zip(final, nets)):
        for s, p, s0 in zip(a, net.parameters(), started[j]):
            torch.testing.assert_close(s, p.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"model {j}: {m}")
            assert p.requires_grad or torch.equal(s, s0)  # frozen: exactly where it started
    assert metrics["final"]["test_loss"] == pytest.approx(test_loss, rel=RTOL)
    assert metrics["final"]["test_acc"] == pytest.approx(test_acc, abs=1e-6)
    if "start" in hooks:  # models 0 and 1 from the source's, model 2 from its seed
        assert all(torch.equal(s, t) for a, b in zip(started, source) for s, t in zip(a, b))
        assert metrics["extra"]["transfer/loaded_tensors"] == 12
    if "penalty" in hooks:  # the term reached the weights: without it every tied model ends elsewhere
        _, free, _, _ = reference_run(cfg, start=hooks.get("start"))
        assert all(not torch.allclose(a[0], next(n.parameters()), atol=1e-4) for a, n in zip(final[:2], free))


def test_ensemble_runs_tied_to_and_started_from_others_equal_each_alone(compose_cfg, tmp_path, monkeypatch):
    # each member its own λ, its own source (run_dir), seed, lr; the narrow one loads and ties
    # only what fits (the heads' biases), the others' tensors untied in its slices
    for name, seed in (("a", 7), ("b", 8)):
        _source(compose_cfg, tmp_path / name, 2, seed)
    base = compose_cfg(BASE + ["trainer.epochs=2", "regularizer.ensemble.components=2", "optimizer=adam",
                               "optimizer.lr=0.003", "regularizer=[ensemble,transfer,parameter_tying,dropout]",
                               "regularizer.transfer.freeze=false",
                               f"regularizer.parameter_tying.run_dir={tmp_path / 'a'}"])
    points = [{"seed": 0, "regularizer.parameter_tying.lam": 0.01, "regularizer.transfer.run_dir": str(tmp_path / "a"),
               "regularizer.dropout.p": 0.1},
              {"seed": 1, "regularizer.parameter_tying.lam": 0.1, "regularizer.transfer.run_dir": str(tmp_path / "b"),
               "optimizer.lr": 0.001},
              {"seed": 2, "regularizer.parameter_tying.lam": 1.0, "regularizer.transfer.run_dir": str(tmp_path / "b"),
               "model.width": 16}]
    assert_each_equals_alone(base, points, tmp_path / "runs", monkeypatch)


def test_a_frozen_tied_ensemble_population_resumes_exactly(compose_cfg, tmp_path, monkeypatch):
    # the checkpoint's optimizer state holds each model's trainable tensors (its head's) only
    _source(compose_cfg, tmp_path / "src", 2, seed=7)
    base = compose_cfg(BASE + ["trainer.epochs=3", "regularizer.ensemble.components=2", "optimizer=adam",
                               "regularizer=[ensemble,transfer,parameter_tying,dropout]",
                               f"regularizer.transfer.run_dir={tmp_path / 'src'}",
                               f"regularizer.parameter_tying.run_dir={tmp_path / 'src'}"])
    points = [{"seed": 0, "regularizer.parameter_tying.lam": 0.1}, {"seed": 1, "regularizer.parameter_tying.lam": 1.0}]
    assert_resumes_exactly(base, points, tmp_path / "runs", monkeypatch)


def test_what_the_former_loop_refused_beside_an_ensemble_is_refused_in_one_line(compose_cfg, tmp_path):
    from regexp.population.compat import incompatibility

    run = ["trainer.epochs=1", "regularizer.ensemble.components=2"]
    train(compose_cfg(BASE + run[:1]), tmp_path / "plain")  # a plain run: its names are no model's of an Ensemble
    for key in ("transfer", "parameter_tying"):
        cfg = compose_cfg(BASE + run + [f"regularizer=[ensemble,{key}]", f"regularizer.{key}.run_dir={tmp_path / 'plain'}"])
        with pytest.raises(ConfigError, match=rf"regularizer\.{key}\.run_dir=.* members\.k\.\*: expected an ensemble run"):
            train(cfg, tmp_path / key)
    for i, (overrides, start) in enumerate((
            (["regularizer=[ensemble,parameter_tying]", "regularizer.parameter_tying.mode=joint"],
             "regularizer parameter_tying.mode=joint with ensemble (the former loop refused it too"),
            (["regularizer=[ensemble,multi_task]"], "regularizer multi_task with ensemble (the former loop refused it"),
            (["regularizer=[masked_reconstruction,ensemble]"],
             "regularizer masked_reconstruction with ensemble (the former loop could not train it"))):
        why = incompatibility(compose_cfg(BASE + run + overrides))
        assert why.startswith(start) and "\n" not in why
        with pytest.raises(ConfigError, match="this run cannot train"):
            train(compose_cfg(BASE + run + overrides), tmp_path / f"refused{i}")

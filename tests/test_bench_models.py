"""scripts/bench.py's plain torch.nn CNN and Transformer (arms A and D of ``--sweep --model``)
compute regexp's model's function, so the arms time the same work: with the regexp model's
weights copied in, their logits agree within float32 rounding (|a - b| <= 1e-5 + 1e-4·|b|)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from regexp.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("model,width,extra", [("cnn", 3, []), ("transformer", 8, []),
                                                ("transformer", 12, ["model.patch_size=4", "model.depth=1"])])
def test_plain_model_computes_regexp_model(compose_cfg, model, width, extra):
    bench = _bench()
    cfg = compose_cfg([f"model={model}", *extra])
    value = bench.sweep_value(model, width)
    key = bench.SWEEPS[model][0].split(".")[1]
    cfg.model[key] = value
    torch.manual_seed(0)
    ours = build_model(cfg.model, (1, 40), 10)
    plain = bench.plain_builder(cfg.model, value)()
    theirs = list(ours.state_dict().values())
    assert [tuple(t.shape) for t in plain.state_dict().values()] == [tuple(t.shape) for t in theirs]
    if model == "transformer":  # the same names: a mismatch in wiring fails here
        plain.load_state_dict(ours.state_dict())
    else:
        plain.load_state_dict(dict(zip(plain.state_dict(), theirs)))
    x = torch.randn(16, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours(x), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-3)  # the input matters


def test_cnn_arms_refuse_another_layout(compose_cfg):
    bench = _bench()
    cfg = compose_cfg(["model=cnn", "model.kernel_size=3"])
    with pytest.raises(SystemExit, match="model.kernel_size=3 is not supported"):
        bench.plain_builder(cfg.model, [2, 4])

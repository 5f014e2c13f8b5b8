"""The model summary a run logs (console and ``run.log``): every conv, pool and linear layer
with its output shape and parameters, and for each conv or pool stage the output-size rule
⌊(n + 2p − k)/s⌋ + 1 (course report §4; with dilation d: ⌊(n + 2p − d(k − 1) − 1)/s⌋ + 1)
worked out on its input, beside the shape the layer actually produced.

The shapes are read from one forward pass of a single zero input (eval mode, no gradient,
the random generators restored), so the printed rule is checked against the real tensors.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from regexp.models.im2col import out_size

CONV = (nn.Conv1d, nn.Conv2d)
POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


def _dims(v: Any, dims: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims


def stage_rows(model: nn.Module, input_shape: Sequence[int]) -> List[Dict[str, Any]]:
    """One row per conv / pool / linear layer that ran: name, kind, input and output shapes
    (without the batch), parameters and, for conv and pool layers, kernel, stride, padding,
    dilation and the sizes the rule predicts (``rule``)."""
    rows: List[Dict[str, Any]] = []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            row = {"name": name, "kind": type(module).__name__, "in": tuple(x.shape[1:]),
                   "out": tuple(output.shape[1:]), "params": sum(p.numel() for p in module.parameters())}
            if isinstance(module, CONV + POOL):
                dims = x.dim() - 2
                k = _dims(module.kernel_size, dims)
                s = _dims(module.stride if module.stride is not None else module.kernel_size, dims)
                p = _dims(module.padding, dims)
                d = _dims(getattr(module, "dilation", 1), dims)
                row.update(kernel=k, stride=s, padding=p, dilation=d,
                           rule=tuple(out_size(n, *a) for n, a in zip(x.shape[2:], zip(k, s, p, d))))
            rows.append(row)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, CONV + POOL + (nn.Linear,))]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def _rule_text(row: Dict[str, Any]) -> str:
    parts = []
    for n, k, s, p, d, o in zip(row["in"][1:], row["kernel"], row["stride"], row["padding"],
                                row["dilation"], row["rule"]):
        span = f"{k}" if d == 1 else f"{d}·({k}−1) − 1"
        parts.append(f"⌊({n} + 2·{p} − {span})/{s}⌋ + 1 = {o}")
    return ", ".join(parts)


def model_summary(model: nn.Module, input_shape: Sequence[int], name: str = "") -> str:
    """The text the run logs: a header, then one line per layer."""
    rows = stage_rows(model, input_shape)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = f"model {name}: {total:,} parameters, input {tuple(input_shape)}"
    if any("rule" in r for r in rows):
        head += "; output size of each conv/pool stage: ⌊(n + 2p − k)/s⌋ + 1"
    lines = [head]
    for r in rows:
        line = f"  {r['name']:<16} {r['kind']:<10} {str(r['in']):>14} -> {str(r['out']):<14} {r['params']:>7,} params"
        if "rule" in r:
            line += "   " + _rule_text(r)
        lines.append(line)
    return "\n".join(lines)

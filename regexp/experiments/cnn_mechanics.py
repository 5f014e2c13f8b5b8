"""``+experiment=cnn_mechanics``: what a convolution layer computes, and what sharing its
weights buys (the course report's §4; Goodfellow et al. §9.2, Prince UDL ch. 10).

1. Shapes: for every stage of ``cfg.model`` (a CNN) the output size ⌊(n + 2p − k)/s⌋ + 1
   beside the shape the layer actually produced, and three parameter counts of the same
   linear map: shared (the conv: C_out·C_in·k + C_out), unshared (a locally connected layer,
   one kernel per output position: C_out·L_out·(C_in·k + 1)) and dense (a fully connected
   layer between the two maps: (C_in·L_in + 1)·C_out·L_out) (``shapes.csv``).
2. im2col: every stage computed as the matrix product W X̂ + b of its flattened kernels W and
   the unfolded input X̂ (:mod:`regexp.models.im2col`), against ``conv1d`` / ``conv2d``
   (``im2col.csv``: the largest difference per stage), drawn for one input in ``im2col.png``.
3. Parameter sharing: the CNN against an MLP (``extra.mlp_depth`` hidden layers, the width
   whose parameter count is nearest the CNN's), each trained for ``extra.seeds`` by the
   framework's trainer (``model=<cnn|mlp>/seed=<s>/``); ``results.csv`` and ``sharing.png``
   give parameters and test accuracy, mean ± std.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._groups import group_config
from regexp.experiments._runs import run_variants, select
from regexp.experiments._settings import require, settings
from regexp.models import build_model, count_params
from regexp.models.im2col import conv_im2col, im2col
from regexp.models.summary import stage_rows
from regexp.tasks import register_task


@dataclass
class Settings:
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    mlp_depth: int = 2
    example: int = 0  # which training input the im2col figure unfolds


def _prod(xs) -> int:
    n = 1
    for v in xs:
        n *= v
    return n


def shape_rows(model: nn.Module, input_shape) -> List[Dict]:
    rows = []
    for r in stage_rows(model, input_shape):
        if "rule" not in r:
            continue
        row = {"stage": r["name"], "layer": r["kind"], "input": "x".join(map(str, r["in"])),
               "kernel": "x".join(map(str, r["kernel"])), "stride": "x".join(map(str, r["stride"])),
               "padding": "x".join(map(str, r["padding"])),
               "rule_size": "x".join(map(str, r["rule"])), "actual_size": "x".join(map(str, r["out"][1:])),
               "params_shared": r["params"]}
        if r["kind"].startswith("Conv"):
            c_in, c_out = r["in"][0], r["out"][0]
            k, n_in, n_out = _prod(r["kernel"]), _prod(r["in"][1:]), _prod(r["out"][1:])
            row["params_unshared"] = c_out * n_out * (c_in * k + 1)
            row["params_dense"] = (c_in * n_in + 1) * c_out * n_out
        rows.append(row)
    return rows


def convs(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


def im2col_check(model: nn.Module, x: torch.Tensor) -> List[Dict]:
    """Each conv stage on the input it sees in ``model``: im2col's W X̂ + b against torch's conv."""
    seen: Dict[nn.Module, torch.Tensor] = {}
    handles = [c.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0])) for c in convs(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    rows = []
    with torch.no_grad():
        for i, c in enumerate(convs(model)):
            inp = seen[c]
            ours = conv_im2col(inp, c.weight, c.bias, c.stride, c.padding, c.dilation)
            torchs = (F.conv1d if inp.dim() == 3 else F.conv2d)(inp, c.weight, c.bias, c.stride, c.padding, c.dilation)
            rows.append({"stage": i, "unfolded_rows": c.weight[0].numel(),
                         "unfolded_cols": _prod(ours.shape[2:]), "max_abs_diff": (ours - torchs).abs().max().item(),
                         "max_abs_output": torchs.abs().max().item()})
    return rows


def _im2col_figure(conv: nn.Module, x: torch.Tensor, title: str):
    """The input, its unfolded matrix X̂, the kernel matrix W and the product against conv."""
    with torch.no_grad():
        cols = im2col(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)[0]
        W = conv.weight.reshape(conv.weight.shape[0], -1)
        ours = (W @ cols + conv.bias[:, None]).reshape(conv.weight.shape[0], -1)
        torchs = conv(x)[0].reshape(conv.weight.shape[0], -1)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    if x.dim() == 3:
        ax.plot(x[0, 0].numpy(), "-o", ms=3, color="k")
        s, p = conv.stride[0], conv.padding[0]
        k = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        for j in range(min(3, cols.shape[1])):  # the first receptive fields, in input coordinates
            ax.axvspan(j * s - p - 0.4, j * s - p + k - 0.6, color=f"C{j}", alpha=0.2,
                       label=f"receptive field of output {j}")
        ax.set_xlabel("position (padding lies outside 0 … n−1)")
        ax.legend(fontsize=7)
    else:
        ax.imshow(x[0, 0].numpy(), cmap="gray")
    ax.set_title(f"input {tuple(x.shape[1:])}")
    im = axes[0][1].imshow(cols.numpy(), aspect="auto", cmap="coolwarm", interpolation="nearest")
    axes[0][1].set_title(f"unfolded input X̂: {cols.shape[0]} rows (C_in·k) × {cols.shape[1]} columns "
                         "(output positions)", fontsize=9)
    axes[0][1].set_xlabel("output position (one receptive field per column)")
    axes[0][1].set_ylabel("channel · kernel offset")
    fig.colorbar(im, ax=axes[0][1])
    im = axes[1][0].imshow(W.detach().numpy(), aspect="auto", cmap="coolwarm", interpolation="nearest")
    axes[1][0].set_title(f"kernels W: {W.shape[0]} rows (C_out) × {W.shape[1]}, the same for every column of X̂",
                         fontsize=9)
    axes[1][0].set_xlabel("channel · kernel offset")
    axes[1][0].set_ylabel("output channel")
    fig.colorbar(im, ax=axes[1][0])
    ax = axes[1][1]
    for c in range(min(3, ours.shape[0])):
        ax.plot(torchs[c].numpy(), color=f"C{c}", lw=3, alpha=0.4, label=f"torch conv, channel {c}")
        ax.plot(ours[c].numpy(), "k:", lw=1, label="W X̂ + b" if c == 0 else None)
    ax.set_title(f"W X̂ + b against torch's conv (max |diff| {(ours - torchs).abs().max().item():.1e})",
                 fontsize=9)
    ax.set_xlabel("output position")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _sharing_figure(rows: List[Dict], title: str):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, name in enumerate(("cnn", "mlp")):
        chosen = [r for r in select(rows, model=name) if r["status"] == "completed"]
        accs = [1 - r["test_error"] for r in chosen]
        if not accs:
            continue
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.bar(i, statistics.mean(accs), yerr=sd, color=f"C{i}", capsize=6)
        ax.scatter([i] * len(accs), accs, color="k", s=10, zorder=3)
        ax.text(i, 0.02, f"{chosen[0]['params']:,} params", ha="center", color="w", fontsize=9)
    ax.set_xticks([0, 1], ["CNN (shared kernels)", "MLP (dense)"])
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def mlp_params(in_dim: int, width: int, depth: int, classes: int) -> int:
    """(n_in + 1)·w + (depth − 1)·(w + 1)·w + (w + 1)·classes: an MLP's weights and biases."""
    return (in_dim + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * classes


def matched_mlp(depth: int, target: int, in_dim: int, classes: int) -> DictConfig:
    """An MLP config with ``depth`` hidden layers, its width the one whose count is nearest ``target``."""
    mlp = group_config("model", "mlp")
    mlp.depth = depth
    mlp.width = min(range(1, target + 1), key=lambda w: (abs(mlp_params(in_dim, w, depth, classes) - target), w))
    return mlp


@register_task("cnn_mechanics")
def cnn_mechanics(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "cnn_mechanics")
    require(cfg.model.name == "cnn", "model.name", cfg.model.name, "cnn (model=cnn or model=cnn_mnist1d)")
    require(s.mlp_depth >= 1, "extra.mlp_depth", s.mlp_depth, "an integer >= 1")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    data = load_data(cfg.data, cfg.seed)
    require(0 <= s.example < len(data.y_train), "extra.example", s.example,
            f"an index in [0, {len(data.y_train) - 1}] of the training set")
    torch.manual_seed(cfg.seed)
    cnn = build_model(cfg.model, data.input_shape, data.num_classes).eval()
    shapes = shape_rows(cnn, data.input_shape)
    checks = im2col_check(cnn, data.x_train[:64])
    params = count_params(cnn)
    mlp = matched_mlp(s.mlp_depth, params, _prod(data.input_shape), data.num_classes)
    mlp_cfg = copy.deepcopy(cfg)
    mlp_cfg.model = mlp
    run_cfgs = {}
    for name, c in (("cnn", cfg), ("mlp", mlp_cfg)):
        c = copy.deepcopy(c)
        c.task = "train"
        c.extra = {}
        run_cfgs[name] = c
    rows = run_variants(run_cfgs, s.seeds, out_dir, label="model")
    where = f"{cfg.data.name}, {cfg.trainer.epochs} epochs, {len(s.seeds)} seeds"
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("shapes", shapes)
        out.table("im2col", checks)
        out.table("results", rows)
        first = convs(cnn)[0]
        out.figure("im2col", _im2col_figure(first, data.x_train[s.example:s.example + 1],
                                            f"stage 0 of the CNN as a matrix product: {cfg.data.name} "
                                            f"training input {s.example}"))
        out.figure("sharing", _sharing_figure(rows, f"parameter sharing: CNN vs MLP "
                                                    f"(depth {mlp.depth}, width {mlp.width}) on {where}"))
    print(text(shapes, checks, rows))
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}


def text(shapes: List[Dict], checks: List[Dict], rows: List[Dict]) -> str:
    lines = ["stage  layer      input     k  s  p  rule  actual  shared  unshared  dense"]
    for r in shapes:
        lines.append(f"{r['stage']:<6} {r['layer']:<9} {r['input']:>8} {r['kernel']:>3} {r['stride']:>2} "
                     f"{r['padding']:>2} {r['rule_size']:>5} {r['actual_size']:>7} {r['params_shared']:>7} "
                     f"{r.get('params_unshared', ''):>9} {r.get('params_dense', ''):>6}")
    lines.append("im2col vs conv, max |diff| per stage: "
                 + ", ".join(f"{c['max_abs_diff']:.1e}" for c in checks))
    for name in ("cnn", "mlp"):
        accs = [1 - r["test_error"] for r in select(rows, model=name) if r["status"] == "completed"]
        if accs:
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"{name}: {select(rows, model=name)[0].get('params', '?')} params, test acc "
                         f"{statistics.mean(accs):.4f} ± {sd:.4f} over {len(accs)} seeds")
    return "\n".join(lines)

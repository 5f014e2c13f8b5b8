"""``+experiment=soft_weight_sharing``: network compression by soft weight sharing (Ullrich,
Meeds & Welling 2017), on the MLP and MNIST-1D.

Their procedure, in three steps, each through the framework's trainer:

1. pretrain: the model without any regularizer for ``trainer.epochs`` (``pretrain/seed=<s>/``);
2. retrain: from the pretrained weights (``transfer`` with ``freeze=false``) for
   ``extra.retrain_epochs`` under the learned mixture prior ``regularizer.soft_weight_sharing``
   (one component pinned at 0 with a large fixed π₀, the other means spread over the pretrained
   weights' range), so that the weights gather around a few values and most around zero
   (``retrain/seed=<s>/``);
3. merge and quantize: components whose means came closer than ``merge_distance`` become one,
   and each weight is set to the mean of its most responsible component (the regularizer's
   ``quantize``; the model is ``retrain/seed=<s>/quantized_model.pt``).

Writes ``results.csv`` (one row per seed: test accuracy pretrained / retrained / quantized,
the number of distinct weight values, the fraction of zeros and the compression ratio; also
printed), ``weights.png`` (Ullrich et al.'s fig. 3: each weight before against after
retraining, the learned means as horizontal lines, the histograms in the margins) and, in each
retrain folder, ``mixture.png`` (the learned prior over the weight histogram, Bishop §9.4.1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig, OmegaConf

from regexp.experiments._figures import Outputs
from regexp.experiments._runs import run_grid
from regexp.experiments._settings import require, settings
from regexp.regularizers.transfer import Transfer
from regexp.tasks import register_task
from regexp.train.io import load_tensors, read_json

SWS = "soft_weight_sharing"
COLUMNS = ("pretrained_test_acc", "retrained_test_acc", "quantized_test_acc", "distinct_values",
           "zero_fraction", "compression")


@dataclass
class Settings:
    retrain_epochs: int = 40
    seeds: List[int] = field(default_factory=lambda: [0])


def covered_weights(path: Path, rcfg) -> torch.Tensor:
    """The weights under the prior, as one vector, from a run's saved state dict (the tensors of
    two or more dimensions, or any with ``include_biases``, named by ``layers``)."""
    state = load_tensors(path, "model file", "delete the run folder and run the experiment again")
    return torch.cat([t.reshape(-1) for n, t in state.items()
                      if (t.dim() >= 2 or rcfg.include_biases) and (not rcfg.layers or any(s in n for s in rcfg.layers))])


def _figure(before: torch.Tensor, after: torch.Tensor, quantized: torch.Tensor, title: str):
    fig = plt.figure(figsize=(7, 6))
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    side = fig.add_subplot(grid[1, 1], sharey=ax)
    means = torch.unique(quantized)
    # one colour per quantized value (its component), black for the weights pruned to zero
    palette = plt.get_cmap("tab10")
    which = torch.searchsorted(means, quantized).tolist()
    colors = ["k" if q == 0 else palette(j % 10) for q, j in zip(quantized.tolist(), which)]
    ax.scatter(before, after, s=2, c=colors, alpha=0.5, rasterized=True)
    for m in means.tolist():
        ax.axhline(m, color="k", lw=0.4, ls=":")
    ax.set_xlabel("pretrained weight")
    ax.set_ylabel("retrained weight (dotted: the quantized values)")
    top.hist(before.numpy(), bins=150, color="0.5", log=True)
    side.hist(after.numpy(), bins=150, color="tab:blue", orientation="horizontal", log=True)
    top.tick_params(labelbottom=False)
    side.tick_params(labelleft=False)
    top.set_title(title, fontsize=9)
    return fig


@register_task("soft_weight_sharing")
def soft_weight_sharing(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, SWS)
    require(s.retrain_epochs >= 1, "extra.retrain_epochs", s.retrain_epochs, "an integer >= 1")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    require(SWS in cfg.regularizer, "regularizer", list(cfg.regularizer),
            f"a list holding {SWS} (the prior of the retraining)")
    require(cfg.regularizer[SWS].quantize, f"regularizer.{SWS}.quantize", cfg.regularizer[SWS].quantize,
            "true (the experiment reports the quantized model)")
    require("transfer" not in cfg.regularizer, "regularizer", list(cfg.regularizer),
            "no transfer: the retraining starts from this experiment's own pretrained run")
    pre = copy.deepcopy(cfg)
    pre.regularizer = {}
    # the runs do not read extra: without it, a relaunch with more seeds or another
    # retrain_epochs finds the runs it already has as the same configs and skips them
    pre.extra = {}
    pre_rows = run_grid(pre, {}, s.seeds, out_dir / "pretrain")
    rows = []
    for seed, p in zip(s.seeds, pre_rows):
        if p["status"] != "completed":  # nothing to retrain from
            rows.append({"seed": seed, "pretrain_status": p["status"], "retrain_status": "not run",
                         "pretrain_dir": p["run_dir"], "retrain_dir": ""})
            continue
        re = copy.deepcopy(cfg)
        re.trainer.epochs = s.retrain_epochs
        re.extra = {}
        # transfer first: the mixture's means start from the weights it finds (the pretrained ones)
        start = OmegaConf.structured(Transfer.Config(run_dir=p["run_dir"], freeze=False))
        re.regularizer = {"transfer": start, **{k: v for k, v in cfg.regularizer.items()}}
        r = run_grid(re, {}, [seed], out_dir / "retrain")[0]
        row = {"seed": seed, "pretrain_status": p["status"], "retrain_status": r["status"],
               "pretrained_test_acc": 1 - p["test_error"]}
        if r["status"] == "completed":
            extra = read_json(Path(r["run_dir"]) / "metrics.json")["extra"]
            row.update({"retrained_test_acc": 1 - r["test_error"],
                        "quantized_test_acc": extra[f"{SWS}/quantized_test_acc"],
                        "components_after_merge": extra[f"{SWS}/merged_components"],
                        "distinct_values": extra[f"{SWS}/distinct_values"],
                        "zero_fraction": extra[f"{SWS}/zero_fraction"],
                        "compression": extra[f"{SWS}/compression"]})
        rows.append({**row, "pretrain_dir": p["run_dir"], "retrain_dir": r["run_dir"]})
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("results", rows)
        done = next((r for r in rows if "quantized_test_acc" in r), None)
        if done is not None:
            rcfg = cfg.regularizer[SWS]
            before = covered_weights(Path(done["pretrain_dir"]) / "model.pt", rcfg)
            after = covered_weights(Path(done["retrain_dir"]) / "model.pt", rcfg)
            quantized = covered_weights(Path(done["retrain_dir"]) / "quantized_model.pt", rcfg)
            title = (f"{cfg.model.name} on {cfg.data.name}, seed {done['seed']}: test acc "
                     f"{done['pretrained_test_acc']:.3f} pretrained, {done['retrained_test_acc']:.3f} retrained, "
                     f"{done['quantized_test_acc']:.3f} quantized\n{done['distinct_values']} values, "
                     f"{done['zero_fraction']:.1%} zeros, compression {done['compression']:.1f}x")
            out.figure("weights", _figure(before, after, quantized, title))
    print(table_text(rows))
    failed = sum(r["pretrain_status"] != "completed" or r["retrain_status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": 2 * len(rows), "failed": failed}


def table_text(rows: List[Dict]) -> str:
    lines = ["seed  " + "  ".join(f"{c:>19}" for c in COLUMNS)]
    for r in rows:
        cells = [f"{r[c]:>19.4f}" if isinstance(r.get(c), float) else f"{r.get(c, 'failed')!s:>19}"
                 for c in COLUMNS]
        lines.append(f"{r['seed']:<4}  " + "  ".join(cells))
    return "\n".join(lines)

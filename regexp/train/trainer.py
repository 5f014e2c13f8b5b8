"""A run's entry point and the pieces every run shares: its folder, resume, seeds, device, evaluation.

``train`` accepts a run's folder (keeps, refuses or resumes what is there) and hands the run to
the one training loop, the population engine (regexp/population/engine.py), as a population of
one member. The rest is what that loop, the probes and ``regexp.landscape`` share: the device,
the global generators' seeding and checkpointed state, a model's evaluation, the initial model
with its regularizers, and the check that a checkpoint belongs to this config.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from regexp.errors import ConfigError
from regexp.models import build_model
from regexp.regularizers import build_regularizers
from regexp.regularizers.base import Context
from regexp.train.io import load_checkpoint, read_json
from regexp.train.rundir import save_hydra_files

SPLITS = ("train", "val", "test")
# Keys that may differ between a checkpoint's config and the run that resumes it.
# The device and the data folder may change too: a run moved to another machine goes on there.
# (trainer.engine: a key of checkpoints written when a lone run could choose its loop.)
RESUMABLE_KEYS = ("trainer.resume", "trainer.overwrite", "trainer.progress", "trainer.checkpoint_every",
                  "trainer.threads", "trainer.device", "trainer.engine", "data.root", "logger")
INIT_MODEL = "init_model.pt"
RUN_FILES = ("metrics.json", "checkpoint.pt", "model.pt", "best_model.pt", INIT_MODEL, "label_noise.json",
             "hessian_density.png")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' is invalid here: CUDA is not available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> Dict[str, Any]:
    """Every global generator's state as tensors and plain numbers, so that a checkpoint loads
    with ``torch.load(weights_only=True)`` (numpy's own state tuple holds an ndarray)."""
    version, mt, gauss_next = random.getstate()
    name, keys, np_pos, has_gauss, gauss = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int):
    """Mean cross-entropy and accuracy, as 0-dim tensors (no host sync here)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch])
        loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + batch]).sum()
    model.train(was_training)
    n = max(len(y), 1)
    return loss / n, correct / n


def resumable_checkpoint(path: Path, config: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint at ``path``, if it was written with ``config`` (up to RESUMABLE_KEYS)."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "config" not in ck:
        raise ConfigError(f"{path}: not a regexp checkpoint (no config in it); delete it or start over "
                          "with trainer.overwrite=true")
    same_config(ck["config"], config, path)
    return ck


def same_config(saved: Dict[str, Any], config: Dict[str, Any], path: Path) -> None:
    """Refuse to go on from (or skip as done) a run written with another config."""
    changed = [k for k in config_diff(saved, config)
               if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]
    if changed:
        raise ConfigError(f"{path} was written with another config ({', '.join(changed[:5])} differ); "
                          "resume with the same overrides or start over with trainer.overwrite=true")


def config_diff(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key + ".")
        elif va != vb:
            out.append(key)
    return out


def build_initial_model(cfg: DictConfig, data, device: torch.device, out_dir: Optional[Path]):
    """The model a run starts from, with its regularizers: seeded, built and wrapped (an
    ensemble replaces the model by K members). The caller attaches the regularizers (the
    trainer first counts a step's FLOPs on the bare model). ``regexp.landscape`` rebuilds a
    run's initial weights through this same path."""
    seed_everything(cfg.seed)  # after data generation, which may reseed the global generators
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    ctx = Context(data.num_classes, len(data.y_train), device, data.input_shape, cfg.seed, out_dir,
                  model_cfg=cfg.model, data=data, data_cfg=cfg.data)
    regs = build_regularizers(cfg.regularizer, ctx)
    for r in regs:  # regularizer hook: an ensemble replaces the model by K members
        model = r.wrap_model(model)
    return model, ctx, regs


def _prepare_dir(out_dir: Path, t, sweep: bool, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Refuse to clobber a finished run; return its metrics when it should be skipped."""
    metrics = out_dir / "metrics.json"
    if t.overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for ev in out_dir.glob("events.out.tfevents.*"):
            ev.unlink()
        return None
    if metrics.exists():
        done = read_json(metrics)
        if done.get("status") in ("completed", "diverged"):  # finished: training again changes nothing
            if not (t.resume or sweep):
                raise ConfigError(f"{out_dir} already holds a {done['status']} run; pass trainer.resume=true "
                                  "to keep it, trainer.overwrite=true to replace it, or another hydra.run.dir")
            # kept only if it is this config's run: another config must not pass for it
            if "config" in done:
                same_config(done["config"], config, metrics)
            elif (out_dir / "checkpoint.pt").exists():
                resumable_checkpoint(out_dir / "checkpoint.pt", config)
            return {**done, "skipped": True}  # a re-launched sweep skips it
    if (out_dir / "checkpoint.pt").exists() and not (t.resume or sweep):
        raise ConfigError(f"{out_dir} holds an unfinished run (checkpoint.pt); pass trainer.resume=true "
                          "to continue it or trainer.overwrite=true to start over")
    return None


def train(cfg: DictConfig, out_dir: Path, overrides: List[str] = (), sweep: bool = False,
          on_epoch: Optional[Callable[[Dict[str, float]], bool]] = None) -> Dict[str, Any]:
    """Train the run ``cfg`` describes, writing into ``out_dir``; return ``metrics.json``'s content.

    A lone run is a population of one member: this accepts the folder (a finished run is kept
    or refused, an unfinished one resumed), then the population engine trains it
    (regexp/population/engine.py, the one training loop). ``sweep``: a sweep's point, which
    goes on from or skips what an earlier launch left without ``trainer.resume``.
    ``on_epoch(row)`` (a search's pruner) sees each evaluated epoch's metrics; True stops the
    run there with ``status: pruned`` (checkpointed, so a later launch may go on from it)."""
    from regexp.population.run import lone_run_record, train_lone

    t0 = time.time()
    t = cfg.trainer
    record = lone_run_record(cfg)  # refuses a config no model can train before touching the folder
    out_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    skipped = _prepare_dir(out_dir, t, sweep, config)
    if skipped is not None:
        return skipped
    resume = (out_dir / "checkpoint.pt").exists() and (t.resume or sweep)
    ck = resumable_checkpoint(out_dir / "checkpoint.pt", config) if resume else None
    save_hydra_files(out_dir, cfg)  # the folder is this run's now: describe it
    return train_lone(cfg, out_dir, overrides, ck, t0, record, on_epoch)


def _hparams(cfg: DictConfig, overrides: List[str] = (), params: int = 0,
             plain: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The hyperparameters shown in TensorBoard's HParams tab, by dotted config key.

    Every setting of the resolved config that can change what a run computes, so that every run
    has the same keys (per model, optimizer, ... kind) whatever its overrides: ``seed``, all of
    ``data.*``, ``model.*``, ``optimizer.*``, ``scheduler.*``, ``regularizer.<name>.*`` and
    ``trainer.*``, and ``regularizers``, the regularizers' names ("none" for none). Left out:
    ``task``, ``sweep.*``, ``logger.*``, ``probe.*`` (measurements, not training), ``extra.*`` (plot settings), ``data.root``,
    ``data.download`` and the trainer's bookkeeping switches. Numbers, booleans and strings
    stay as they are; None is "None" and a list its JSON text. The overrides need no entry of
    their own (their keys are config keys), and the parameter count is a metric
    (``TBLogger.final_metrics``); both arguments are kept for the callers.
    """
    skip = {"task", "sweep", "logger", "extra", "hydra", "probe", "data.root", "data.download", "trainer.progress",
            "trainer.resume", "trainer.overwrite", "trainer.checkpoint_every", "trainer.eval_batch_size"}
    hp: Dict[str, Any] = {}

    def leaves(node: Any, prefix: str) -> None:
        if prefix in skip:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                leaves(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            hp[prefix] = json.dumps(node)
        elif node is None:
            hp[prefix] = "None"
        else:
            hp[prefix] = node

    leaves(plain if plain is not None else OmegaConf.to_container(cfg, resolve=True), "")
    hp["regularizers"] = ",".join(cfg.regularizer) or "none"
    return hp

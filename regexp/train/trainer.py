"""Train one model from a composed config and write everything a run leaves behind.

Reads top to bottom: set-up (device, seeds, data, model, regularizers, optimizer, schedule),
optional resume from a checkpoint, the epoch loop, and the final files. The step loop never
waits for the device or writes a log: the loss is summed on the device and read once per
epoch, which is also when divergence is detected.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from regexp.data import load_data
from regexp.errors import ConfigError
from regexp.models import build_model, count_params
from regexp.models.summary import model_summary
from regexp.optim import build_optimizer, build_scheduler
from regexp.probes.runner import build_probes, checkpoint_fields, metrics_fields, record as probe_record
from regexp.regularizers import build_regularizers
from regexp.regularizers.base import Context
from regexp.train.io import load_checkpoint, read_json, save_torch, write_json
from regexp.train.records import best_score, improves, run_metrics
from regexp.train.rundir import save_hydra_files
from regexp.train.threads import set_threads, step_flops
from regexp.train import signals
from regexp.train.signals import StopFlag
from regexp.train.sparsity import count_sparsity
from regexp.train.tblog import TBLogger, layer_grad_norms

SPLITS = ("train", "val", "test")
# Keys that may differ between a checkpoint's config and the run that resumes it.
# The device and the data folder may change too: a run moved to another machine goes on there.
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
    """Train the model ``cfg`` describes, writing into ``out_dir``; return ``metrics.json``'s content.

    ``on_epoch(row)`` (a search's pruner) sees each evaluated epoch's metrics; True stops the
    run there with ``status: pruned`` (checkpointed, so a later launch may go on from it)."""
    t0 = time.time()
    t = cfg.trainer
    out_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    record = _engine_record(cfg, sweep)  # refuses an impossible trainer.engine first
    skipped = _prepare_dir(out_dir, t, sweep, config)
    if skipped is not None:
        return skipped
    resume = (out_dir / "checkpoint.pt").exists() and (t.resume or sweep)
    ck = resumable_checkpoint(out_dir / "checkpoint.pt", config) if resume else None
    save_hydra_files(out_dir, cfg)  # the folder is this run's now: describe it
    logging.getLogger("regexp").info("trainer.engine=%s trains this run with the %s engine: %s",
                                     t.get("engine", "auto"), record["engine"], record["engine_reason"])
    # one loop: a population of one member. A signal already received: the trainer's set-up
    # below writes the interrupted run's files, and neither engine takes a step.
    if record["engine"] == "population" and signals.requested() is None:
        from regexp.population.run import train_lone

        return train_lone(cfg, out_dir, overrides, ck, t0, record, on_epoch)

    # ---- set-up
    device = resolve_device(t.device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    data = load_data(cfg.data, cfg.seed)
    n = len(data.y_train)
    bs = n if t.batch_size == "full" else int(t.batch_size)
    if bs > n:
        raise ConfigError(f"trainer.batch_size={bs} is invalid: expected at most {n}, the number of "
                          "training examples (or \"full\")")
    if len(data.noisy_indices):
        write_json(out_dir / "label_noise.json", {"indices": data.noisy_indices.tolist(),
                                                  "original_labels": data.clean_labels.tolist()})
    model, ctx, regs = build_initial_model(cfg, data, device, out_dir)
    logging.getLogger("regexp").info(model_summary(model, data.input_shape, cfg.model.name))
    threads, threads_why = set_threads(t.threads, device, lambda: step_flops(model, data.input_shape, bs))
    for r in regs:
        r.attach(model)
    if ck is None or not (out_dir / INIT_MODEL).exists():
        # the weights before any step, for the loss along the line from them to the final ones
        # (regexp.landscape); a resumed run built the same ones, so an existing file stays
        save_torch(out_dir / INIT_MODEL, model.state_dict())
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for r in regs:
        groups += r.param_groups()
    optimizer = build_optimizer(cfg.optimizer, groups, device)
    two_pass = getattr(optimizer, "needs_closure", False)
    ctx.optimizer = optimizer
    steps_per_epoch = math.ceil(n / bs)
    total_steps = t.epochs * steps_per_epoch
    scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps)
    # Only regularizers that define a penalty add a loss term (and a penalty/<name> curve).
    penalizers = [r for r in regs if r.penalizes()]
    loss_kwargs: Dict[str, Any] = {}
    for r in regs:
        loss_kwargs.update(r.loss_kwargs())
    tensors = {s: tuple(v.to(device) for v in data.split(s)) for s in SPLITS}
    x_train, y_train = tensors["train"]
    order = torch.Generator().manual_seed(cfg.seed)  # data order, separate from dropout & noise
    probes = build_probes(cfg.probe, x_train, y_train, cfg.seed, t.eval_batch_size)

    # ---- state, fresh or from the last checkpoint
    epoch, step_in_epoch, perm = 0, 0, None
    history: List[Dict[str, float]] = []
    probe_history: List[Dict[str, float]] = []  # one row per measurement: epoch and probe values
    best: Optional[Dict[str, float]] = None
    best_state = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        for r, s in zip(regs, ck["regularizers"]):
            r.load_state_dict(s)
        epoch, step_in_epoch, history = ck["epoch"], ck["step_in_epoch"], ck["history"]
        best, best_state = ck["best"], ck["best_state"]
        probe_history = ck["probe_history"]
        if probes is not None:
            probes.load_state_dict(ck["probes"])
        perm = ck["perm"].to(device) if ck["perm"] is not None else None
        running = list(ck["running"].to(device).unbind())
        order.set_state(ck["order"])
        set_rng_state(ck["rng"])

    def checkpoint(status: str) -> None:
        save_torch(out_dir / "checkpoint.pt", {
            "config": config, "status": status, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "perm": perm.cpu() if perm is not None else None, "running": torch.stack(running).cpu(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "regularizers": [r.state_dict() for r in regs],
            "history": history, "best": best, "best_state": best_state, "order": order.get_state(),
            "rng": rng_state(),
            **checkpoint_fields(probes.state_dict() if probes is not None else None, probe_history)})

    score = best_score(regs)  # the population ranks epochs with the same function

    params = count_params(model)
    tb = TBLogger(out_dir, cfg.logger.tensorboard, purge_step=epoch + 1 if resume else None)
    if not resume:
        tb.hparams(_hparams(cfg, overrides, params))
    status, stop_reason = "completed", None
    bar = tqdm(total=t.epochs, initial=epoch, desc="epoch", unit="epoch", leave=False,
               disable=None if t.progress else True, dynamic_ncols=True)

    # ---- the loop
    with StopFlag() as stop:
        if stop.requested:  # a signal during start-up: stop before the first step, recorded
            status, stop_reason = "interrupted", stop.signum
        while epoch < t.epochs and status == "completed":
            model.train()
            if step_in_epoch == 0:
                perm = torch.randperm(n, generator=order).to(device)
                # summed loss, then each penalty, kept on the device: read once per epoch
                running = [torch.zeros((), device=device) for _ in range(1 + len(penalizers))]
            grad_norms = None
            for i in range(step_in_epoch, steps_per_epoch):
                idx = perm[i * bs:(i + 1) * bs]
                xb, yb = x_train[idx], y_train[idx]
                for r in regs:
                    xb, yb = r.transform_batch(xb, yb, model)

                def backward(xb=xb, yb=yb, idx=idx):
                    logits = model(xb)
                    # regularizer hook: a regularizer may replace the data loss (ensemble, bagging)
                    loss = next((l for l in (r.data_loss(model, logits, yb, idx, loss_kwargs) for r in regs)
                                 if l is not None), None)
                    if loss is None:
                        loss = F.cross_entropy(logits, yb, **loss_kwargs)
                    terms = [loss] + [r.batch_penalty(model, loss, xb, yb, loss_kwargs) for r in penalizers]
                    total = loss if len(terms) == 1 else sum(terms)
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    if t.grad_clip:
                        nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                    return terms

                terms = backward()
                if i == steps_per_epoch - 1 and cfg.logger.grad_norms:
                    grad_norms = layer_grad_norms(model)
                for r in regs:  # regularizer hook: decoupled weight decay acts here
                    r.before_step(model)
                if two_pass:  # SAM: the same batch's gradient once more, at the ascended weights
                    optimizer.step(lambda: backward()[0])
                else:
                    optimizer.step()
                scheduler.step()
                for r in regs:
                    r.after_step(model)
                for acc, v in zip(running, terms):
                    acc.add_(v.detach(), alpha=len(idx))
                step_in_epoch = i + 1
                if stop.requested:
                    break
            if stop.requested and step_in_epoch < steps_per_epoch:
                status, stop_reason = "interrupted", stop.signum
                break
            epoch, step_in_epoch = epoch + 1, 0

            # ---- end of epoch: one sync, divergence check, evaluation, logs
            sums = (torch.stack(running) / n).tolist()
            if not all(math.isfinite(v) for v in sums):
                status = "diverged"
                tb.scalars({"diverged": 1.0, "loss/train_running": sums[0]}, epoch)
                break
            lr = optimizer.param_groups[0]["lr"]
            logs = {"loss/train_running": sums[0], "lr": lr}
            logs.update({f"penalty/{r.name}": v for r, v in zip(penalizers, sums[1:])})
            with torch.no_grad():
                logs["weights/l2_norm"] = torch.sqrt(sum(p.pow(2).sum() for p in model.parameters())).item()
            if grad_norms:
                logs.update({f"grad_norm/{k}": v for k, v in zip(grad_norms, torch.stack(list(
                    grad_norms.values())).tolist())})
            if epoch % t.eval_every == 0 or epoch == t.epochs:
                row = {"epoch": epoch}
                for s in SPLITS:
                    if len(tensors[s][1]):
                        with count_sparsity(model, enabled=s == "test") as sparsity:
                            l, a = evaluate(model, *tensors[s], t.eval_batch_size)
                        row[f"{s}_loss"], row[f"{s}_acc"] = l.item(), a.item()
                        logs[f"loss/{s}"], logs[f"acc/{s}"] = row[f"{s}_loss"], row[f"{s}_acc"]
                        for k, v in sparsity.items():  # hidden units off on the test set
                            row[f"{s}_{k}"] = logs[f"sparsity/{s}_{k}"] = v.item()
                if not math.isfinite(row["train_loss"]):
                    status = "diverged"
                    tb.scalars({"diverged": 1.0}, epoch)
                    break
                history.append(row)
                if improves(row, best, score):
                    best = dict(row)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row.get('val_acc', float('nan')):.3f}")
                if any([r.epoch_end(model, row) for r in regs]):  # every one sees the row
                    stop_reason = "early_stopping"
                if on_epoch is not None and on_epoch(dict(row)):
                    stop_reason = "pruned"
            # periodic probes; the last epoch's is the end-of-run measurement below
            if probes is not None and probes.due(epoch) and epoch < t.epochs and stop_reason is None:
                probe_record(probe_history, epoch, probes.measure(model), logs)
            tb.scalars(logs, epoch)
            for r in regs:
                r.log(tb, epoch)
            if cfg.logger.histogram_every and epoch % cfg.logger.histogram_every == 0:
                tb.histograms(model, epoch)
            bar.update(1)
            if t.checkpoint_every and epoch % t.checkpoint_every == 0 and epoch < t.epochs:
                checkpoint("running")
            if stop.requested:
                status, stop_reason = "interrupted", stop.signum
                break
            if stop_reason == "pruned":
                status = "pruned"
                break
            if stop_reason == "early_stopping":
                break
    bar.close()

    # ---- final files; metrics.json last, so its presence marks a finished write
    if status != "diverged" and (epoch or step_in_epoch):  # no step taken: nothing to resume from
        checkpoint(status)
    final = history[-1] if history else None
    extra: Dict[str, float] = {}
    final_probes: Dict[str, float] = {}
    if status == "completed":
        if best_state is not None and any(r.restores_best for r in regs):
            model.load_state_dict(best_state)
            final = best
        for r in regs:
            extra.update(r.report(model, tensors, lambda m, x, y: evaluate(m, x, y, t.eval_batch_size)))
        if probes is not None:  # on the final weights, those model.pt holds
            final_probes, probe_logs = probes.measure(model), {}
            probe_record(probe_history, epoch, final_probes, probe_logs)
            tb.scalars(probe_logs, epoch)
            probes.save_figures(out_dir, tb, epoch)
        save_torch(out_dir / "model.pt", model.state_dict())
        if best_state is not None:
            save_torch(out_dir / "best_model.pt", best_state)
    metrics = run_metrics(status, epoch, final, best, history, params, t0, device, threads, threads_why,
                          overrides, extra, config, record)
    metrics.update(metrics_fields(probes is not None, final_probes, probe_history))
    if stop_reason == "early_stopping":
        metrics["stopped_epoch"] = epoch
    if status == "diverged":
        metrics["diverged_epoch"] = epoch
    if status == "pruned":
        metrics["pruned_epoch"] = epoch
    if status == "interrupted":
        metrics["signal"] = int(stop_reason)
    tb.final_metrics(metrics)
    tb.close()
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _engine_record(cfg: DictConfig, sweep: bool) -> Dict[str, str]:
    """Which loop trains the run, as metrics.json records it (logged once the folder is the run's)."""
    from regexp.population.run import choose_run_engine

    engine, why = choose_run_engine(cfg, sweep)
    return {"engine": engine, "engine_reason": why}


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
            "trainer.resume", "trainer.overwrite", "trainer.checkpoint_every", "trainer.eval_batch_size",
            "trainer.engine"}
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

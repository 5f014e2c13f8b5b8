"""What a run records about itself, written once for the trainer and the population engine:
which evaluated epoch is its best, and the fields every ``metrics.json`` holds."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

Row = Dict[str, float]


def best_score(regs: Sequence[Any]) -> Callable[[Row], tuple]:
    """The key an evaluated epoch's row is ranked by: highest val accuracy (ties: lower val
    loss), unless a regularizer (early stopping on val_loss) selects the best epoch by its
    own metric, so that the weights kept are the ones it judged best."""
    monitor = next((r.selects_best_by for r in regs if r.selects_best_by), "val_acc")
    if monitor == "val_acc":
        return lambda r: (r["val_acc"], -r["val_loss"])
    return lambda r: (-r["val_loss"], r["val_acc"])


def improves(row: Row, best: Optional[Row], score: Callable[[Row], tuple]) -> bool:
    """Whether ``row`` becomes the best epoch (only epochs with a validation split compete)."""
    if "val_acc" not in row:
        return False
    return best is None or score(row) > score(best)


def run_metrics(status: str, epochs: int, final: Optional[Row], best: Optional[Row], history, params: int,
                t0: float, device: torch.device, threads: int, threads_reason: str, overrides,
                extra: Dict[str, float], config: Dict[str, Any],
                engine: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """``metrics.json``'s common fields, in their order (each engine then adds its own:
    ``diverged_epoch``, ``signal``, ``probes`` ...)."""
    return {
        "status": status, "epochs": epochs, "final": final,
        "best": best if best is not None else final,
        "params": params, "wall_s": round(time.time() - t0, 3), "device": str(device),
        "threads": threads, "threads_reason": threads_reason,
        **(engine or {}),  # how the run was trained: engine, engine_reason
        "overrides": list(overrides), "extra": extra, "history": history, "config": config,
    }

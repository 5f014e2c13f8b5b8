"""Shared fixtures: the CLI in a subprocess, and configs composed in-process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core: a second torch thread in each would oversubscribe the cores (two
    # busy processes with two threads each on two cores run several times slower)
    import torch

    torch.set_num_threads(1)
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _tuning_cache(tmp_path_factory, monkeypatch):
    """Populations measure their buckets' form once per machine (regexp/population/tuning.py);
    the tests keep that cache in their own session folder, never the user's."""
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "regexp-cache"))


@pytest.fixture(autouse=True)
def _pad_every_model(request):
    """The population tests give members of different sizes to check the padded path (masked
    units inside one bucket); a CNN's, Transformer's or GRU's members would otherwise share a
    bucket only within the cost ratio (engine.SMALL_WIDTH). Every model's widths up to 32
    share one here, as an MLP's do by default; tests marked ``model_small_widths`` see the
    defaults."""
    if request.node.get_closest_marker("model_small_widths") is not None:
        yield
        return
    from regexp.population import engine

    # a patch of its own: tests call their monkeypatch's undo() midway, which must not undo this
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "SMALL_WIDTH", {"mlp": 32, "cnn": 32, "transformer": 32, "gru": 32})
        yield


def run_cli(args: List[str], cwd: Path, check: bool = True, env_extra=None, timeout: int = 300):
    """``python -m regexp.run ARGS`` with one torch thread and no progress bar."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) go before the overrides
    rest = [a for a in args if not a.startswith("-")]
    proc = subprocess.run([sys.executable, "-m", "regexp.run", *flags, "trainer.progress=false", *rest],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(tmp_path):
    return lambda args, **kw: run_cli(args, tmp_path, **kw)


@pytest.fixture(scope="session")
def compose_cfg():
    """compose(overrides) -> the composed config, as the CLI would build it."""
    from regexp.config import register_configs

    register_configs()

    def _compose(overrides=()):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=False)

    return _compose


def read_scalars(run_dir: Path):
    """Every scalar tag of a run folder's event files: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class StopAfter:
    """A StopFlag stand-in that 'receives' SIGTERM once it has been asked ``checks`` times
    (a training loop asks once per step, and once more after each epoch's end)."""

    def __init__(self, checks: int):
        self.left, self.signum = checks, None

    @property
    def requested(self) -> bool:
        import signal

        self.left -= 1
        if self.left < 0:
            self.signum = signal.SIGTERM
        return self.signum is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def lone_batch(model, loss, x, y):
    """One model's training step as a batch penalty's formula sees it (``stacked=False``): the
    same fields the population fills from its stacked forward (regexp/population/engine.py)."""
    import torch.nn.functional as F

    from regexp.regularizers.base import Batch

    return Batch(x, y, loss, model, F.cross_entropy, [p for p in model.parameters() if p.requires_grad],
                 tuple(x.shape[1:]))


def train_with_and_without(base, others, leaver, tmp_path, case: str):
    """A population with ``leaver`` between two ``others``, and one without it; ``leaver``
    diverges (case "diverged") or stops early ("stopped") before its fourth epoch."""
    from regexp.population import train_population

    with_it = train_population(base, [others[0], leaver, others[1]], tmp_path / "with")
    without = train_population(base, others, tmp_path / "without")
    if case == "diverged":
        assert with_it[1]["status"] == "diverged" and with_it[1]["diverged_epoch"] < 4
    else:
        assert with_it[1]["status"] == "completed" and with_it[1]["stopped_epoch"] < 4
    return with_it, without

"""Every shipped config composes and instantiates; bad input fails with one clear line."""
from __future__ import annotations

import torch
import pytest

from conftest import CONFIGS
from regexp.config import validate
from regexp.errors import ConfigError
from regexp.models import build_model
from regexp.optim import build_optimizer, build_scheduler
from regexp.regularizers import REGULARIZERS, build_regularizers
from regexp.regularizers.base import Context


def options(group: str):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "optimizer", "scheduler", "trainer"])
def test_every_group_option_composes_and_validates(compose_cfg, group):
    for name in options(group):
        cfg = compose_cfg([f"{group}={name}"])
        validate(cfg)
        if group in ("model", "optimizer", "scheduler", "data"):
            assert cfg[group].name == name


def test_every_model_optimizer_scheduler_instantiates(compose_cfg):
    for model in options("model"):
        for opt in options("optimizer"):
            cfg = compose_cfg([f"model={model}", f"optimizer={opt}"])
            net = build_model(cfg.model, (1, 40), 10)
            o = build_optimizer(cfg.optimizer, [{"params": list(net.parameters())}], torch.device("cpu"))
            for sched in options("scheduler"):
                s = build_scheduler(compose_cfg([f"scheduler={sched}"]).scheduler, o, 100)
                assert s.get_last_lr()[0] > 0


def test_every_regularizer_composes_alone_and_together(compose_cfg):
    names = options("regularizer")
    assert set(names) == set(REGULARIZERS)
    # transfer needs the folder of an earlier run; its own tests load one
    cfg = compose_cfg([f"regularizer=[{','.join(names)}]", "regularizer.transfer.run_dir=/some/run"])
    validate(cfg)
    assert list(cfg.regularizer) == names
    regs = build_regularizers(cfg.regularizer, Context(10, 100, torch.device("cpu"), (1, 40)))
    assert [r.name for r in regs] == names


def test_every_experiment_composes(compose_cfg):
    from regexp.tasks import TASKS
    import regexp.experiments  # noqa: F401

    for name in options("experiment"):
        cfg = compose_cfg([f"+experiment={name}"])
        validate(cfg)
        assert cfg.task in TASKS, name


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=0", "optimizer.lr=0.0 is invalid: expected a number > 0"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0 is invalid"),
    ("data.label_noise=1.5", "data.label_noise=1.5 is invalid: expected a number in [0, 1]"),
    ("data.val_fraction=1", "data.val_fraction=1.0 is invalid"),
    ("model.width=0", "model.width=0 is invalid: expected an integer >= 1"),
    ("model.depth=0", "model.depth=0 is invalid: expected an integer >= 1"),
    ("model.activation=swish", "model.activation='swish' is invalid: expected one of relu, tanh"),
    ("trainer.batch_size=-3", "trainer.batch_size=-3 is invalid"),
    ("trainer.batch_size=half", "trainer.batch_size='half' is invalid: expected an integer >= 1 or \"full\""),
    ("trainer.epochs=0", "trainer.epochs=0 is invalid"),
    ("trainer.device=tpu", "trainer.device='tpu' is invalid: expected one of auto, cpu, cuda"),
])
def test_out_of_range_values_are_rejected(compose_cfg, override, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg([override]))
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["regularizer=[dropout]", "regularizer.dropout.p=1.0"], "regularizer.dropout.p=1.0 is invalid: expected a number in [0, 1)"),
    (["regularizer=[dropout]", "regularizer.dropout.p=-0.1"], "regularizer.dropout.p=-0.1 is invalid"),
    (["regularizer=[weight_decay]", "regularizer.weight_decay.lam=-1"], "regularizer.weight_decay.lam=-1.0 is invalid"),
])
def test_bad_regularizer_values(compose_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(overrides))
    assert message in str(e.value)


# Through the real CLI: exit status, the one line that names the key, no traceback.
@pytest.mark.parametrize("args, code, needle", [
    (["model.widht=3"], 1, "Key 'widht' not in 'MLPConfig'"),
    (["model.width=abc"], 1, "full_key: model.width"),
    (["model=resnet"], 1, "Could not find 'model/resnet'"),
    (["regularizer=[dropout]", "regularizer.dropout.q=0.1"], 1, "full_key: regularizer.dropout.q"),
    (["optimizer.lr=0"], 2, "error: optimizer.lr=0.0 is invalid: expected a number > 0"),
    (["regularizer=[dropout]", "regularizer.dropout.p=1"], 2, "error: regularizer.dropout.p=1.0 is invalid"),
    (["data.label_noise=-0.5"], 2, "error: data.label_noise=-0.5 is invalid"),
    (["model.depth=0"], 2, "error: model.depth=0 is invalid"),
    (["trainer.batch_size=5000"], 2, "error: trainer.batch_size=5000 is invalid: expected at most 3600"),
    (["data=mnist", "data.root=/nonexistent/regexp", "data.download=false"], 2,
     "error: data=mnist: no files under /nonexistent/regexp/MNIST/raw (data.download=false)"),
])
def test_cli_bad_input(cli, tmp_path, args, code, needle):
    run = tmp_path / "bad"
    proc = cli([*args, f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "metrics.json").exists()

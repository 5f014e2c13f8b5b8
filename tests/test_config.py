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


# Options that configure another option's model (the MNIST-1D paper's CNN is model.name=cnn).
PRESETS = {"cnn_mnist1d": "cnn"}


def options(group: str):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "optimizer", "scheduler", "trainer"])
def test_every_group_option_composes_and_validates(compose_cfg, group):
    for name in options(group):
        cfg = compose_cfg([f"{group}={name}"])
        validate(cfg)
        if group in ("model", "optimizer", "scheduler", "data"):
            assert cfg[group].name == PRESETS.get(name, name)


def test_every_model_optimizer_scheduler_instantiates(compose_cfg):
    # composing is the slow part: each scheduler's config once, reused for every pair
    schedulers = [compose_cfg([f"scheduler={sched}"]).scheduler for sched in options("scheduler")]
    for model in options("model"):
        for opt in options("optimizer"):
            cfg = compose_cfg([f"model={model}", f"optimizer={opt}"])
            net = build_model(cfg.model, (1, 40), 10)
            o = build_optimizer(cfg.optimizer, [{"params": list(net.parameters())}], torch.device("cpu"))
            for sched in schedulers:
                s = build_scheduler(sched, o, 100)
                assert s.get_last_lr()[0] > 0


def test_every_regularizer_composes_alone_and_together(compose_cfg):
    names = options("regularizer")
    assert set(names) == set(REGULARIZERS)
    # transfer and parameter_tying need the folder of an earlier run; their own tests load one
    cfg = compose_cfg([f"regularizer=[{','.join(names)}]", "regularizer.transfer.run_dir=/some/run",
                       "regularizer.parameter_tying.run_dir=/some/run"])
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
    ("model.depth=-1", "model.depth=-1 is invalid: expected an integer >= 0 (0: logistic regression)"),
    ("model.activation=swish", "model.activation='swish' is invalid: expected one of relu, tanh"),
    ("model.init=glorot", "model.init='glorot' is invalid: expected one of default, xavier, xavier_normal, he, "
                          "he_uniform, normal, uniform, zeros"),
    ("model.init_a=0", "model.init_a=0.0 is invalid: expected a number > 0 or null"),
    ("trainer.batch_size=-3", "trainer.batch_size=-3 is invalid"),
    ("trainer.batch_size=half", "trainer.batch_size='half' is invalid: expected an integer >= 1 or \"full\""),
    ("trainer.epochs=0", "trainer.epochs=0 is invalid"),
    ("trainer.device=tpu", "trainer.device='tpu' is invalid: expected one of auto, cpu, cuda"),
    # non-finite numbers, anywhere: inf passes lr > 0, and nan fails every comparison
    ("optimizer.lr=inf", "optimizer.lr=inf is invalid: expected a finite number"),
    ("optimizer.lr=nan", "optimizer.lr=nan is invalid: expected a finite number"),
    ("optimizer.lr=-inf", "optimizer.lr=-inf is invalid: expected a finite number"),
    ("trainer.grad_clip=inf", "trainer.grad_clip=inf is invalid: expected a finite number"),
    ("+sweep.params={model.width:[4,nan]}", "sweep.params.model.width[1]=nan is invalid: expected a finite number"),
    ("seed=-1", "seed=-1 is invalid: expected an integer in [0, 2**32 - 1 = 4294967295]"),
    ("seed=4294967296", "seed=4294967296 is invalid: expected an integer in [0, 2**32 - 1"),
    ("sweep.seeds=[0,-2]", "sweep.seeds[1]=-2 is invalid: expected an integer in [0, 2**32 - 1"),
    ("data.split_seed=-3", "data.split_seed=-3 is invalid: expected an integer in [0, 2**32 - 1"),
    # `+key=` force-adds a key even to a structured node: refused unless the schema has it
    ("+trainer.nosuch=1", "trainer.nosuch is not a key of trainer: expected one of epochs, batch_size"),
    ("++trainer.nosuch=1", "trainer.nosuch is not a key of trainer: expected one of epochs"),
    ("+model.nosuch=1", "model.nosuch is not a key of model=mlp: expected one of name, width, depth"),
    ("+optimizer.nosuch=1", "optimizer.nosuch is not a key of optimizer=adam: expected one of name, lr"),
    ("+data.nosuch=1", "data.nosuch is not a key of data=mnist1d: expected one of name, root"),
    ("+logger.nosuch=1", "logger.nosuch is not a key of logger: expected one of tensorboard"),
    ("+nosuch=1", "nosuch is not a key of the config: expected one of seed, task, data"),
])
def test_out_of_range_values_are_rejected(compose_cfg, override, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg([override]))
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["regularizer=[dropout]", "regularizer.dropout.p=1.0"], "regularizer.dropout.p=1.0 is invalid: expected a number in [0, 1)"),
    (["regularizer=[dropout]", "regularizer.dropout.p=-0.1"], "regularizer.dropout.p=-0.1 is invalid"),
    (["regularizer=[weight_decay]", "regularizer.weight_decay.lam=-1"], "regularizer.weight_decay.lam=-1.0 is invalid"),
    (["regularizer=[weight_decay]", "regularizer.weight_decay.lam=nan"],
     "regularizer.weight_decay.lam=nan is invalid: expected a finite number"),
    (["regularizer=[dropout]", "+regularizer.dropout.q=0.1"],
     "regularizer.dropout.q is not a key of regularizer.dropout: expected one of p, input_p, mc_samples"),
    (["optimizer=adamw", "optimizer.weight_decay=-0.01"], "optimizer.weight_decay=-0.01 is invalid: expected a number >= 0"),
    (["optimizer=adagrad", "optimizer.initial_accumulator_value=-1"],
     "optimizer.initial_accumulator_value=-1.0 is invalid: expected a number >= 0"),
    (["model=cnn", "model.kernel_size=[5,3,3]"], "model.kernel_size=[5, 3, 3] is invalid: expected an integer "
     ">= 1 or a list of 2 of them, one per entry of model.channels"),
    (["model=cnn_mnist1d", "model.stride=[2,2]"], "model.stride=[2, 2] is invalid: expected an integer >= 1 or a "
     "list of 3 of them"),
    (["model=cnn", "model.padding=-1"], "model.padding=-1 is invalid: expected an integer >= 0 or a list of 2 of "
     "them, one per entry of model.channels, or null (kernel_size // 2)"),
    (["model=cnn", "model.head=pool"], "model.head='pool' is invalid: expected one of gap, flatten"),
    (["model=gru", "model.head=mean"], "model.head='mean' is invalid: expected one of flatten, last"),
    (["model=gru", "model.hidden_size=0"], "model.hidden_size=0 is invalid: expected an integer >= 1"),
    (["model=gru", "model.init=xavier"], "model.init='xavier' is invalid: expected default (model=gru keeps"),
    (["model=transformer", "model.mlp_ratio=0"], "model.mlp_ratio=0.0 is invalid: expected a number > 0"),
    (["model=transformer", "model.mlp_ratio=-2"], "model.mlp_ratio=-2.0 is invalid: expected a number > 0"),
    # > 0 but int(64 * 0.01) = 0 hidden units in the feed-forward block
    (["model=transformer", "model.mlp_ratio=0.01"],
     "model.mlp_ratio=0.01 is invalid: expected a number > 0 giving int(model.embed_dim * model.mlp_ratio) >= 1"),
])
def test_bad_regularizer_values(compose_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(overrides))
    assert message in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["++trainer.epochs=3"],  # ++ on a key that exists overrides it
    ["+extra.anything.goes=1"],  # extra is free-form on purpose
    ["+sweep.params={model.width:[4,8]}"],  # a dict-typed field takes any key
    ["+experiment=double_descent"],
    ["seed=4294967295"],
    ["model=transformer", "model.mlp_ratio=0.02"],  # int(64 * 0.02) = 1 hidden unit
    ["optimizer=adamw", "optimizer.weight_decay=0"],
])
def test_valid_edge_cases_pass(compose_cfg, overrides):
    validate(compose_cfg(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["model.channels=[1,2"], "model.channels: cannot parse the override 'model.channels=[1,2'"),
    (["regularizer=[dropout,dropout]"], "regularizer=[dropout,dropout] is invalid: dropout is listed twice"),
    (["regularizer=[l1,dropout,l1]"], "regularizer=[l1,dropout,l1] is invalid: l1 is listed twice"),
    (["regularizer=[l1],[dropout,dropout]"], "regularizer=[dropout,dropout] is invalid"),  # a -m sweep
])
def test_check_overrides(overrides, message):
    from regexp.config import check_overrides

    with pytest.raises(ConfigError) as e:
        check_overrides(overrides)
    assert message in str(e.value)


def test_check_overrides_passes_good_ones():
    from regexp.config import check_overrides

    check_overrides(["regularizer=[dropout,l1]", "model.width=4,8", "+experiment=double_descent",
                     "++trainer.epochs=3", "~regularizer", "regularizer=[]", "hydra.run.dir=/tmp/x"])


def test_composing_a_regularizer_twice_keeps_one(compose_cfg):
    """Why the CLI refuses ``regularizer=[dropout,dropout]``: Hydra merges both entries into
    one node, so the second would silently vanish."""
    cfg = compose_cfg(["regularizer=[dropout,dropout]"])
    assert list(cfg.regularizer) == ["dropout"]


def _assert_one_error_line(proc, code, needle):
    err = proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err


# Bad input through the real CLI: exit 2, one `error:` line naming the key and what is valid,
# no traceback, nothing trained. Refused before Hydra composes (malformed override, a
# regularizer twice) or by Hydra (unknown key, wrong type, unknown option): no run folder.
@pytest.mark.parametrize("args, needle, no_dir", [
    (["optimizer.lr=inf"], "error: optimizer.lr=inf is invalid: expected a finite number", False),
    (["optimizer.lr=nan"], "error: optimizer.lr=nan is invalid: expected a finite number", False),
    (["regularizer=[weight_decay]", "regularizer.weight_decay.lam=nan"],
     "error: regularizer.weight_decay.lam=nan is invalid: expected a finite number", False),
    (["optimizer=adamw", "optimizer.weight_decay=-1"],
     "error: optimizer.weight_decay=-1.0 is invalid: expected a number >= 0", False),
    (["optimizer=adagrad", "optimizer.initial_accumulator_value=-0.5"],
     "error: optimizer.initial_accumulator_value=-0.5 is invalid: expected a number >= 0", False),
    (["model=transformer", "model.mlp_ratio=0"], "error: model.mlp_ratio=0.0 is invalid: expected a number > 0", False),
    (["seed=-1"], "error: seed=-1 is invalid: expected an integer in [0, 2**32 - 1 = 4294967295]", False),
    (["seed=4294967296"], "error: seed=4294967296 is invalid: expected an integer in [0, 2**32 - 1", False),
    (["+trainer.nosuch=1"], "error: trainer.nosuch is not a key of trainer: expected one of epochs, batch_size", False),
    (["+model.nosuch=1"], "error: model.nosuch is not a key of model=mlp: expected one of name, width", False),
    (["+optimizer.nosuch=1"], "error: optimizer.nosuch is not a key of optimizer=adam: expected one of name, lr", False),
    (["+data.nosuch=1"], "error: data.nosuch is not a key of data=mnist1d: expected one of name, root", False),
    (["regularizer=[dropout,dropout]"],
     "error: regularizer=[dropout,dropout] is invalid: dropout is listed twice; expected each regularizer at most once",
     True),
    (["model=cnn", "model.channels=[1,2"],
     "error: model.channels: cannot parse the override 'model.channels=[1,2'", True),
    # Hydra's own composition errors, in the same one-line form
    (["model.nosuch=1"], "error: model.nosuch is not a key of model=mlp: expected one of name, width", True),
    (["trainer.epochs=abc"],
     "error: trainer.epochs='abc' is invalid: Value 'abc' of type 'str' could not be converted to Integer", True),
    (["model=nosuch"], "error: model=nosuch is invalid: could not find 'model/nosuch'; expected one of cnn, cnn_mnist1d, gru, mlp, transformer",
     True),
    (["regularizer=[nosuch]"], "error: regularizer=nosuch is invalid: could not find 'regularizer/nosuch'; expected one of",
     True),
    (["+experiment=nosuch"], "error: experiment=nosuch is invalid: could not find 'experiment/nosuch'", True),
    (["+trainer.epochs=3"], "error: Could not append to config. An item is already at 'trainer.epochs'.", True),
])
def test_cli_refuses_with_one_line(cli, tmp_path, args, needle, no_dir):
    run = tmp_path / "run"
    proc = cli([*args, f"hydra.run.dir={run}"], check=False)
    _assert_one_error_line(proc, 2, needle)
    assert proc.stdout.strip() == "", proc.stdout
    assert not (run / "metrics.json").exists()
    if no_dir:
        assert not run.exists()


@pytest.mark.parametrize("args, needle", [
    (["optimizer.lr=inf"], "error: optimizer.lr=inf is invalid"),
    (["+trainer.nosuch=1"], "error: trainer.nosuch is not a key of trainer"),
])
def test_validating_callback_refuses_before_the_run_folder(cli, tmp_path, args, needle):
    """regexp.config.ValidateOnRunStart (a hydra.callbacks entry) checks before Hydra writes."""
    run = tmp_path / "run"
    proc = cli([*args, "++hydra.callbacks.validate._target_=regexp.config.ValidateOnRunStart",
                f"hydra.run.dir={run}"], check=False)
    _assert_one_error_line(proc, 2, needle)
    assert not run.exists()


# -m: errors found before any job runs refuse the whole multirun in the same way.
@pytest.mark.parametrize("args, needle", [
    (["model.nosuch=1", "model.width=4,8"], "error: model.nosuch is not a key of model=mlp"),
    (["model.width=4,abc"], "error: model.width='abc' is invalid"),
    (["model=mlp,nosuch"], "error: model=nosuch is invalid: could not find 'model/nosuch'"),
    (["regularizer=[l1],[dropout,dropout]"], "error: regularizer=[dropout,dropout] is invalid: dropout is listed twice"),
    (["model.width=4,8", "model.channels=[1,2"], "error: model.channels: cannot parse the override"),
])
def test_cli_multirun_refuses_with_one_line(cli, tmp_path, args, needle):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", *args, "trainer.epochs=1", f"hydra.sweep.dir={sweep}"], check=False)
    _assert_one_error_line(proc, 2, needle)
    assert not list(sweep.rglob("metrics.json"))


@pytest.mark.parametrize("args, needle", [
    (["--help"], "== Configuration groups =="),
    (["--cfg=job", "+experiment=double_descent"], "task: sweep"),
    (["--cfg=job", "++trainer.epochs=7"], "epochs: 7"),
    (["--info=defaults", "model=cnn"], "model/cnn"),
])
def test_cli_flags_still_work(cli, args, needle):
    proc = cli(args)
    assert needle in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


def test_hydra_full_error_still_gives_the_trace(cli):
    proc = cli(["model.nosuch=1"], check=False, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


# Through the real CLI: exit status, the one line that names the key, no traceback.
@pytest.mark.parametrize("args, code, needle", [
    (["model.widht=3"], 2, "error: model.widht is not a key of model=mlp: expected one of name, width"),
    (["model.width=abc"], 2, "error: model.width='abc' is invalid"),
    (["model=resnet"], 2, "error: model=resnet is invalid: could not find 'model/resnet'"),
    (["regularizer=[dropout]", "regularizer.dropout.q=0.1"], 2,
     "error: regularizer.dropout.q is not a key of regularizer.dropout: expected one of p, input_p, mc_samples"),
    (["optimizer.lr=0"], 2, "error: optimizer.lr=0.0 is invalid: expected a number > 0"),
    (["regularizer=[dropout]", "regularizer.dropout.p=1"], 2, "error: regularizer.dropout.p=1.0 is invalid"),
    (["data.label_noise=-0.5"], 2, "error: data.label_noise=-0.5 is invalid"),
    (["model.depth=-1"], 2, "error: model.depth=-1 is invalid"),
    (["trainer.batch_size=5000"], 2, "error: trainer.batch_size=5000 is invalid: expected at most 3600"),
    (["data=mnist", "data.root=/nonexistent/regexp", "data.download=false"], 2,
     "error: data=mnist: no files under /nonexistent/regexp/MNIST/raw (data.download=false)"),
])
def test_cli_bad_input(cli, tmp_path, args, code, needle):
    run = tmp_path / "bad"
    proc = cli([*args, f"hydra.run.dir={run}"], check=False)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("point, message", [
    ({"optimizer.lr": "inf"}, "optimizer.lr=inf is invalid: expected a finite number"),
    ({"optimizer.lr": float("nan")}, "optimizer.lr=nan is invalid: expected a finite number"),
    ({"model.width": 0}, "model.width=0 is invalid: expected an integer >= 1"),
    ({"model.widths": [8, -1]}, "model.widths=[8, -1] is invalid"),
])
def test_sweep_points_are_checked_like_whole_configs(compose_cfg, point, message):
    # checked_config walks the whole tree once per base, then checks only each point's own
    # values: a bad value gets the message validate() gives the point's whole config
    from regexp.sweep import checked_config, point_config

    base = compose_cfg()
    with pytest.raises(ConfigError) as whole:
        validate(point_config(base, point))
    with pytest.raises(ConfigError) as short:
        checked_config(base, point)
    assert message in str(short.value) and str(short.value) == str(whole.value)
    assert checked_config(base, {"model.width": 7}).model.width == 7

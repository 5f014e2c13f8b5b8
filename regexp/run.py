"""Command line entry point: ``python -m regexp.run [overrides]``.

Hydra composes the config from ``configs/``; everything else happens in
:mod:`regexp.tasks`, which validates it and hands it to the task it names.

Bad input of any kind ends in one line ``error: <message>`` on stderr and exit status 2:
:func:`regexp.config.check_overrides` checks the command line before Hydra sees it (malformed
overrides, a regularizer listed twice), and :func:`main` turns Hydra's own composition errors
(unknown key, wrong type, unknown option) into that one line, instead of Hydra's multi-line
report with a stack trace and a ``HYDRA_FULL_ERROR`` hint. ``HYDRA_FULL_ERROR=1`` still gives
Hydra's full report. Other exceptions (bugs) keep Hydra's traceback.
"""
from __future__ import annotations

# First, before the slow imports: a SIGTERM / SIGINT from here on is recorded, and the run
# stops (status interrupted) before its first step instead of dying without a trace.
from regexp.train import signals

signals.install()

import contextlib  # noqa: E402
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, NoReturn, Optional

import hydra
from omegaconf import DictConfig

from regexp.config import (check_overrides, describe_node, override_parse_message, register_configs,
                           unknown_key_message)
from regexp.errors import ConfigError


def _config_path() -> str:
    # A checkout keeps configs/ beside the package; a wheel ships them as regexp.configs.
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return str(checkout) if (checkout / "config.yaml").is_file() else "pkg://regexp.configs"


register_configs()


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def _hydra_main(cfg: DictConfig):
    from regexp.tasks import run_task

    return run_task(cfg)


def main(cfg: Optional[DictConfig] = None):
    """The ``regexp`` command (and ``python -m regexp.run``): Hydra's main, with bad input
    reported as one ``error:`` line and exit status 2."""
    if cfg is not None:  # Hydra's pass-through: run the task on a given config
        return _hydra_main(cfg)
    try:
        check_overrides(_cli_overrides())
        with _compact_hydra_errors():
            return _hydra_main()
    except Exception as e:  # raised outside Hydra's own reporting (--help, --info ...)
        line = describe_error(e)
        if line is None or _full_error():
            raise
        _fail(line)


def _cli_overrides() -> List[str]:
    """The overrides on the command line, parsed exactly as Hydra's main will parse them."""
    from hydra._internal.utils import get_args_parser

    return list(get_args_parser().parse_args().overrides or [])


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _fail(line: str) -> NoReturn:
    sys.stdout.flush()
    print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(2)


@contextlib.contextmanager
def _compact_hydra_errors() -> Iterator[None]:
    """Hydra runs each step (composition, the run, the multirun) in ``run_and_report``
    (hydra/_internal/utils.py), which prints an exception's message, often a stack trace and
    a HYDRA_FULL_ERROR hint, then exits 1. Bad input is caught before it gets there and
    reported as one line with exit 2; anything else still goes to Hydra's reporting."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report

    def run_and_report(func: Any) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as e:
                line = describe_error(e)
                if line is None or _full_error():
                    raise
                _fail(line)

        return original(guarded)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def describe_error(e: BaseException) -> Optional[str]:
    """One line for bad input (ours or a Hydra/OmegaConf composition error); None for others."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, OmegaConfBaseException,
                                  ValidationError)

    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, OverrideParseException):
        return override_parse_message(e.override, e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        return _missing_config(e)
    cause = e.__cause__ if isinstance(e, HydraException) else e
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        msg = _first_line(getattr(cause, "msg", None) or str(cause))
        schema = getattr(cause, "object_type", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and schema is not None \
                and dataclasses.is_dataclass(schema) and "/" not in key:
            parent_path = key.rsplit(".", 1)[0] if "." in key else ""
            parent = getattr(cause, "parent_node", None)
            where = describe_node(parent_path, parent) if isinstance(parent, DictConfig) \
                else (parent_path or "the config")
            return unknown_key_message(key, where, [f.name for f in dataclasses.fields(schema)])
        if isinstance(cause, ValidationError) and hasattr(cause, "value"):
            return f"{key}={cause.value!r} is invalid: {msg}"
        head = _one_line(str(e)) if cause is not e else ""
        return f"{head}: {key}: {msg}" if head else f"{key}: {msg}"
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return _one_line(str(e)) or type(e).__name__
    return None


def _missing_config(e: Any) -> str:
    """``model=nosuch``: name the option and list the valid ones."""
    group, _, name = str(e.missing_cfg_file).rpartition("/")
    options = [o for o in (e.options or []) if not o.startswith("base_")]  # base_*: schemas
    if not options and group == "regularizer":
        from regexp.regularizers import REGULARIZERS

        options = sorted(REGULARIZERS)
    if not options and group == "probe":
        from regexp.probes import PROBES

        options = sorted(PROBES)
    valid = f"expected one of {', '.join(options)}" if options else "no such config"
    return f"{group}={name} is invalid: could not find '{e.missing_cfg_file}'; {valid}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _one_line(text: str) -> str:
    """Hydra's multi-line message as one line (without its config search path listing)."""
    out = []
    for ln in str(text).splitlines():
        ln = ln.strip()
        if ln.startswith("Config search path"):
            break
        if ln:
            out.append(ln)
    return " ".join(out)


if __name__ == "__main__":
    main()

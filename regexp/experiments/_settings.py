"""An experiment's own settings (``extra:``), checked against a dataclass schema.

Each gallery experiment declares its knobs as a dataclass with the defaults its YAML also
shows; ``settings`` merges ``cfg.extra`` over it, so a misspelt key or a value of the wrong
type becomes one ConfigError naming ``extra.<key>`` instead of a KeyError deep inside a run.
"""
from __future__ import annotations

from typing import Any, Iterable, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regexp.errors import ConfigError

T = TypeVar("T")


def settings(cfg: DictConfig, schema: Type[T], task: str) -> T:
    """``cfg.extra`` merged over ``schema``'s defaults, as a ``schema`` instance."""
    base = OmegaConf.structured(schema)
    extra = cfg.get("extra") or {}
    for key in extra:
        if key not in base:
            raise ConfigError(f"extra.{key} is invalid for task={task}: expected one of "
                              + ", ".join(f"extra.{k}" for k in base))
    try:
        merged = OmegaConf.merge(base, extra)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"extra.{e.full_key}={e.value!r} is invalid for task={task}: expected a value "
                          f"of the type in its schema ({first})") from None


def require(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise the project's standard message when a range check fails."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {valid}")


def require_choices(key: str, values: Iterable[Any], options: Iterable[Any]) -> None:
    options = list(options)
    for v in values:
        require(v in options, key, v, "values among " + ", ".join(map(str, options)))

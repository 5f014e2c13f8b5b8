"""Config-group options composed by Hydra, so a gallery figure uses exactly what ``group=name`` gives.

An experiment that compares several optimizers (or draws every scheduler) needs one config
per option. Composing them with Hydra, instead of rebuilding them by hand, keeps the
figure in step with ``configs/<group>/<name>.yaml``; the option the command line selected
(``optimizer=momentum optimizer.momentum=0.5``) replaces its own entry, so overrides apply.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

from omegaconf import DictConfig

from regexp.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def group_config(group: str, name: str) -> DictConfig:
    """The config ``group=name`` composes to (inside a Hydra app, or standalone)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from regexp.config import register_configs

    register_configs()
    try:
        if GlobalHydra.instance().is_initialized():
            return compose("config", overrides=[f"{group}={name}"])[group]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=[f"{group}={name}"])[group]
    except MissingConfigException:
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name!r} is unknown: expected one of {', '.join(options)}") from None


def _given(overrides: Iterable[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def selected_configs(cfg: DictConfig, group: str, names: List[str], overrides: Iterable[str],
                     lrs: Mapping[str, float] = None,
                     settings: Mapping[str, Mapping[str, Any]] = None) -> Dict[str, DictConfig]:
    """One config per name of ``group``; the command line's choice stands in for its own name,
    with ``settings`` / ``lrs`` applied as ``with_settings`` does.

    An option chosen on the command line but missing from ``names`` is appended.
    """
    overrides = list(overrides)
    chosen = cfg[group]
    names = list(names)
    if _given(overrides, group) and chosen.name not in names:
        names.append(chosen.name)
    configs = {name: copy.deepcopy(chosen) if name == chosen.name else group_config(group, name)
               for name in names}
    return with_settings(cfg, group, configs, overrides, lrs, settings)


def with_settings(cfg: DictConfig, group: str, configs: Mapping[str, DictConfig], overrides: Iterable[str],
                  lrs: Mapping[str, float] = None,
                  settings: Mapping[str, Mapping[str, Any]] = None) -> Dict[str, DictConfig]:
    """Copies of ``configs`` with the figure's own per-option values: ``settings`` (name ->
    {key: value}, checked by the caller) replaces those keys, ``lrs`` (name -> lr) the ``lr``.
    A key given on the command line for the selected option (``optimizer.lr=...``) wins over both.
    """
    overrides = list(overrides)
    out: Dict[str, DictConfig] = {}
    for name, base in configs.items():
        own = name == cfg[group].name
        c = copy.deepcopy(base)
        replace = dict((settings or {}).get(name, {}))
        if lrs and name in lrs:
            replace["lr"] = float(lrs[name])
        for key, value in replace.items():
            if not (own and _given(overrides, f"{group}.{key}")):
                c[key] = value
        out[name] = c
    return out

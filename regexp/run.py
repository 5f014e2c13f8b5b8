"""Command line entry point: ``python -m regexp.run [overrides]``.

Hydra composes the config from ``configs/``; everything else happens in
:mod:`regexp.tasks`, which validates it and hands it to the task it names.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from regexp.config import register_configs


def _config_path() -> str:
    # A checkout keeps configs/ beside the package; a wheel ships them as regexp.configs.
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return str(checkout) if (checkout / "config.yaml").is_file() else "pkg://regexp.configs"


register_configs()


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def main(cfg: DictConfig):
    from regexp.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()

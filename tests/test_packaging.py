"""The wheel carries the code and the configs; every package is listed in pyproject.toml."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

from conftest import ROOT


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "regexp").rglob("__init__.py")}
    assert found | {"regexp.configs"} == listed


def test_wheel_carries_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("regexp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped and {f"regexp/configs/{s}" for s in shipped} <= names
    assert "regexp/run.py" in names and "regexp/train/trainer.py" in names

"""A run folder belongs to one live run at a time, and keeps describing the run that owns it.

- :class:`RunLock` holds an exclusive ``flock`` on ``<folder>/.lock`` for the whole run. The
  kernel drops it when the holder dies, so a stale lock (a killed run) is simply taken over;
  a second live run into the folder is refused, naming the holder's pid.
- Hydra's own ``.hydra/`` files are written before the task runs, so a refused run (another
  config on resume, a finished run, a locked folder) would leave them describing the refused
  config. The config sets ``hydra.output_subdir: null`` and :func:`save_hydra_files` writes
  the same three files once the task has accepted the folder.
- Each job of a multirun appends one line to its launch's ledger, so the end-of-sweep summary
  counts the jobs of this launch only, not every run a relaunched sweep folder holds.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from regexp.errors import ConfigError

HYDRA_SUBDIR = ".hydra"
LOCK = ".lock"
LEDGER_ENV = "REGEXP_LAUNCH_LEDGER"  # set by the multirun parent, inherited by every job


class FolderBusy(ConfigError):
    """The run folder is held by another live run: nothing may be written into it."""


class RunLock:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderBusy(f"{self.folder} is in use by another run (pid {holder}); wait for it to "
                             "finish, or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def save_hydra_files(out_dir: Path, cfg: Any) -> None:
    """Write ``.hydra/{config,hydra,overrides}.yaml`` as Hydra would, if ``out_dir`` is the
    folder of the Hydra job running now (sweep points below it get none, as before)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    if Path(hc.hydra.runtime.output_dir).resolve() != Path(out_dir).resolve():
        return
    from regexp.train.io import atomic_write

    folder = Path(out_dir) / HYDRA_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hc),
                       ("overrides.yaml", hc.hydra.overrides.task)):
        text = OmegaConf.to_yaml(node)
        atomic_write(folder / name, lambda p, t=text: p.write_text(t, encoding="utf-8"))


def ledger_line(out_dir: Path, status: str) -> None:
    """Append this job's folder and status to the launch's ledger (one ``write`` on an
    ``O_APPEND`` descriptor, so parallel jobs never interleave)."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    line = json.dumps({"dir": str(out_dir), "status": status}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # the summary then misses this job; the job itself is unaffected


def read_ledger(path: Path) -> Dict[str, str]:
    """Folder -> status of each job of one launch (the last line of a folder wins)."""
    out: Dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for ln in lines:
        try:
            rec = json.loads(ln)
            out[rec["dir"]] = rec["status"]
        except (ValueError, KeyError, TypeError):
            continue
    return out


def check_output_folder(key: str, value: Any) -> None:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` must name a folder that can be made: an empty
    value would put the run's files into the current directory."""
    text = "" if value is None else str(value)
    if not text.strip():
        raise ConfigError(f"{key}={text!r} is invalid: expected a folder path (an empty one would "
                          "write the run into the current directory)")
    path = Path(text).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "names a file" if p == path else f"lies below the file {p}"
                raise ConfigError(f"{key}={text} is invalid: it {what}; expected a folder")
            break

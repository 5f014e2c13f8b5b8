"""trainer.threads=auto: the rule (regexp.train.threads), with no timed assertions."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from regexp.train import threads
from regexp.train.threads import THRESHOLD, choose_threads, idle_cores, step_flops

BIG = THRESHOLD * 100


@pytest.fixture
def idle(monkeypatch):
    """idle(n): pretend n cores are idle and the machine has 8 physical cores."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda cpus=None: 8)

    def _set(n: int) -> None:
        monkeypatch.setattr(threads, "idle_cores", lambda window=0.1: n)
    return _set


def test_tiny_step_gets_one_thread_without_measuring(monkeypatch):
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.1: pytest.fail("measured"))
    n, reason = choose_threads("auto", THRESHOLD / 10)
    assert n == 1 and reason.startswith("auto: 1") and "<" in reason
    assert choose_threads(None, THRESHOLD / 10)[0] == 1  # null means auto too


def test_explicit_count_is_honoured(idle):
    idle(1)
    assert choose_threads(3, 1.0) == (3, "requested: 3")
    assert choose_threads(2, BIG)[0] == 2
    with pytest.raises(ValueError):
        choose_threads(0, BIG)


def test_big_step_never_gets_more_than_the_idle_cores(idle):
    idle(1)
    assert choose_threads("auto", BIG)[0] == 1
    idle(2)
    n, reason = choose_threads("auto", BIG)
    assert n == 2 and "2 idle" in reason


def test_parallel_jobs_share_the_idle_cores(idle):
    idle(8)
    assert choose_threads("auto", BIG)[0] == 8
    assert choose_threads("auto", BIG, jobs=2)[0] == 4
    idle(1)
    assert choose_threads("auto", BIG, jobs=2)[0] == 1  # never more than the idle cores
    assert choose_threads("auto", BIG, jobs=16)[0] == 1  # never 0
    idle(5)  # a job starting after its sibling took 3 of 8 cores: its share is still 4
    assert choose_threads("auto", BIG, jobs=2)[0] == 4


def test_physical_cores_and_omp_num_threads_cap_auto(monkeypatch):
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.1: 16)
    monkeypatch.setattr(threads, "physical_cores", lambda cpus=None: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads("auto", BIG)[0] == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto", BIG)[0] == 1


def test_step_flops_counts_linear_layers_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 100), nn.BatchNorm1d(100), nn.ReLU(),
                          nn.Linear(100, 10))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 3 x (2 FLOPs per multiply-add) x batch x weights
    assert step_flops(model, (1, 40), 50) == pytest.approx(3 * 2 * 50 * (40 * 100 + 100 * 10))
    assert model.training and all(m.training for m in model.modules())
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # BN stats untouched


def test_step_flops_falls_back_to_the_weights_when_the_probe_fails():
    class Odd(nn.Module):  # a plain tensor attribute cannot meet meta weights
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(40, 10), torch.ones(10)

        def forward(self, x):
            return self.lin(x.flatten(1)) * self.scale

    assert step_flops(Odd(), (1, 40), 10) == 6 * 10 * (40 * 10 + 10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_mnist1d", "gru", "transformer"])
def test_step_flops_of_the_project_models(compose_cfg, name):
    from regexp.models import build_model

    model = build_model(compose_cfg([f"model={name}"]).model, (1, 40), 10)
    one, hundred = step_flops(model, (1, 40), 1), step_flops(model, (1, 40), 100)
    assert one > 0 and hundred == pytest.approx(100 * one)
    params = sum(p.numel() for p in model.parameters())
    assert one >= 3 * 2 * 0.5 * params  # every weight is used at least about once per example


@pytest.mark.parametrize("files, quota", [
    ({"proc/self/cgroup": "0::/job\n", "sys/fs/cgroup/job/cpu.max": "150000 100000\n"}, 1.5),
    ({"proc/self/cgroup": "0::/job\n", "sys/fs/cgroup/job/cpu.max": "max 100000\n"}, None),
    ({"proc/self/cgroup": "1:cpu,cpuacct:/\n", "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "400000",
      "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, 4.0),
    ({"proc/self/cgroup": "1:cpu:/\n", "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1"}, None),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads._cgroup_quota(tmp_path) == quota


def test_idle_cores_is_within_the_allowed_cores():
    n = idle_cores()
    assert isinstance(n, int) and 1 <= n <= len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)


def test_idle_cores_without_proc_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_STAT", tmp_path / "absent")
    assert idle_cores(window=0.0) == min(len(os.sched_getaffinity(0)), threads.usable_cores())


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_idle_cores_sees_a_busy_neighbour():
    n = len(os.sched_getaffinity(0))
    # bounded: the spinner stops by itself after 20 s even if the kill below never ran
    spinner = "import time\nt = time.time() + 20\nwhile time.time() < t: pass"
    spin = subprocess.Popen([sys.executable, "-c", spinner])
    try:
        time.sleep(0.3)  # let it start spinning
        # One busy core cannot be idle; take the smallest of a few samples (other work on a
        # shared machine only lowers it further, which the bound allows).
        assert min(idle_cores() for _ in range(3)) <= n - 1
    finally:
        spin.kill()
        spin.wait()

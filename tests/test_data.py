"""Data: MNIST-1D defaults, splits, label noise, and torchvision formats on tiny files."""
from __future__ import annotations

import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from regexp.config import DataConfig
from regexp.data import load_data
from regexp.errors import ConfigError


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "mnist1d", **kw})


def test_mnist1d_published_defaults():
    d = load_data(data_cfg(val_fraction=0.0), seed=0)
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.num_classes == 10 and len(d.y_val) == 0
    assert torch.bincount(torch.cat([d.y_train, d.y_test])).tolist() == [500] * 10


def test_validation_split_is_carved_from_train_and_test_untouched():
    full = load_data(data_cfg(val_fraction=0.0), seed=0)
    d = load_data(data_cfg(val_fraction=0.1), seed=0)
    assert len(d.y_val) == 400 and len(d.y_train) == 3600
    assert torch.equal(d.x_test, full.x_test)
    rows = {tuple(r) for r in full.x_train.flatten(1).tolist()}
    split = [tuple(r) for r in torch.cat([d.x_train, d.x_val]).flatten(1).tolist()]
    assert len(set(split)) == 4000 and set(split) == rows


def test_n_train_subset_and_larger_generated_test_set():
    d = load_data(data_cfg(n_train=500, n_test=1500), seed=3)
    base = load_data(data_cfg(), seed=3)
    assert len(d.y_train) == 500 and len(d.y_test) == 1500
    assert torch.equal(d.x_test[:1000], base.x_test)  # the published test set comes first
    with pytest.raises(ConfigError, match="data.n_train=5000 is invalid"):
        load_data(data_cfg(n_train=5000), seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.5, 1.0])
def test_label_noise_fraction_is_exact_and_reproducible(fraction):
    clean = load_data(data_cfg(n_train=1000), seed=7)
    noisy = load_data(data_cfg(n_train=1000, label_noise=fraction), seed=7)
    again = load_data(data_cfg(n_train=1000, label_noise=fraction), seed=7)
    assert torch.equal(clean.x_train, noisy.x_train)
    changed = (clean.y_train != noisy.y_train).nonzero().flatten()
    assert len(changed) == round(fraction * 1000)  # every chosen label really changed
    assert torch.equal(changed, noisy.noisy_indices)
    assert torch.equal(noisy.clean_labels, clean.y_train[changed])
    assert torch.equal(noisy.y_train, again.y_train)
    if 0 < fraction < 1:  # another seed picks other examples
        other = load_data(data_cfg(n_train=1000, label_noise=fraction, split_seed=7), seed=8)
        moved = load_data(data_cfg(n_train=1000, label_noise=fraction), seed=8)
        assert torch.equal(other.noisy_indices, noisy.noisy_indices)  # data.split_seed pins it
        assert not torch.equal(moved.y_train, noisy.y_train)


def test_label_noise_spreads_over_the_other_classes():
    clean = load_data(data_cfg(val_fraction=0.0), seed=0)
    noisy = load_data(data_cfg(val_fraction=0.0, label_noise=1.0), seed=0)
    offsets = (noisy.y_train - clean.y_train) % 10
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 300  # 4000 / 9 ≈ 444 per offset


def test_corrupt_mnist1d_cache_names_the_file(tmp_path):
    (tmp_path / "mnist1d_5000_seed42.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"mnist1d_5000_seed42.pt: corrupt MNIST-1D cache"):
        load_data(data_cfg(root=str(tmp_path)), seed=0)
    assert (tmp_path / "mnist1d_5000_seed42.pt").read_bytes() == b"not a checkpoint"  # left for the user


# ---- torchvision formats, written by the test itself
def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file as in the MNIST distribution: magic (type 0x08 = ubyte, ndim), sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_cifar(root: Path, per_batch: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # The published batches are Python 2 pickles; torchvision reads them with latin1 keys.
        blob = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                "labels": [int(i) % 10 for i in range(per_batch)]}
        (base / name).write_bytes(pickle.dumps(blob))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_formats_load_through_the_real_code(tmp_path, name, folder):
    write_mnist(tmp_path, folder)
    d = load_data(data_cfg(name=name, root=str(tmp_path), download=False, val_fraction=0.25), seed=0)
    assert d.x_train.shape == (45, 1, 28, 28) and d.x_val.shape == (15, 1, 28, 28)
    assert d.x_test.shape == (20, 1, 28, 28) and d.num_classes == 10
    both = torch.cat([d.x_train, d.x_val])
    assert both.mean().abs() < 1e-5 and (both.std() - 1).abs() < 1e-2  # standardized on train


def test_cifar10_format_loads_through_the_real_code(tmp_path):
    write_cifar(tmp_path)
    d = load_data(data_cfg(name="cifar10", root=str(tmp_path), download=False, val_fraction=0.2), seed=0)
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32)
    assert d.y_test.tolist() == list(range(10))


def test_missing_files_name_the_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_data(data_cfg(name="mnist", root=str(tmp_path), download=False), seed=0)
    msg = str(e.value)
    assert f"no files under {tmp_path}/MNIST/raw (data.download=false)" in msg and "train-images-idx3-ubyte" in msg


def test_truncated_files_are_reported(tmp_path):
    write_mnist(tmp_path, "MNIST")
    img = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="are corrupt or truncated"):
        load_data(data_cfg(name="mnist", root=str(tmp_path), download=False), seed=0)
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConfigError, match="cifar-10-batches-py are corrupt or truncated"):
        load_data(data_cfg(name="cifar10", root=str(tmp_path / "c"), download=False), seed=0)


def test_image_run_through_the_cli(cli, tmp_path):
    write_mnist(tmp_path / "data", "FashionMNIST", n_train=100, n_test=30)
    run = tmp_path / "run"
    cli(["data=fashion_mnist", f"data.root={tmp_path / 'data'}", "data.download=false", "model=cnn",
         "model.channels=[4,8]", "trainer.epochs=1", "trainer.batch_size=30", f"hydra.run.dir={run}"])
    import json
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["final"]["test_acc"] >= 0


def test_k_fold_splits_partition_the_training_set():
    k = 4
    folds = [load_data(data_cfg(folds=k, fold=i, split_seed=5), seed=i) for i in range(k)]
    vals = [tuple(r) for f in folds for r in f.x_val.flatten(1).tolist()]
    assert len(vals) == len(set(vals)) == 4000  # the validation folds are disjoint and cover all
    for f in folds:
        assert len(f.y_train) + len(f.y_val) == 4000
        train = {tuple(r) for r in f.x_train.flatten(1).tolist()}
        assert not train & {tuple(r) for r in f.x_val.flatten(1).tolist()}


# ---- files that must not run code, and damaged data: one line naming the file, before training
class Payload:
    """Unpickling this creates ``marker``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_refused(proc, *needles: str) -> None:
    """The CLI exited 2 with exactly one ``error:`` line holding every needle, no traceback."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert all(n in errors[0] for n in needles), errors[0]
    assert "Traceback" not in proc.stderr and "diverged" not in proc.stdout + proc.stderr


def run_args(tmp_path: Path, root: Path, *extra: str):
    return [f"data.root={root}", *extra, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_1", "test_batch"])
def test_cifar_pickle_payload_is_refused_without_running_it(cli, tmp_path, victim):
    root, marker = tmp_path / "data", tmp_path / "pwned"
    write_cifar(root)
    target = root / "cifar-10-batches-py" / victim
    blob = {"label_names": Payload(marker), "data": Payload(marker), "labels": [0]}
    target.write_bytes(pickle.dumps(blob, protocol=2))  # the published files' protocol
    proc = cli(run_args(tmp_path, root, "data=cifar10", "data.download=false"), check=False)
    assert not marker.exists()  # the payload never ran
    assert_refused(proc, f"{target}: refused to unpickle ", "may hold only arrays")


def test_safe_pickle_reads_the_published_cifar_format(tmp_path):
    from regexp.data.safe_pickle import load

    # Python 2 / numpy 1 pickles (the published batches) name numpy.core, not numpy._core.
    blob = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2], "batch_label": "b",
            "filenames": [b"a.png"], "num_vis": 3072}
    raw = pickle.dumps(blob, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    (tmp_path / "batch").write_bytes(raw)
    got = load(tmp_path / "batch")
    assert got["labels"] == [1, 2] and got["filenames"] == [b"a.png"] and got["num_vis"] == 3072
    assert got["data"].dtype == np.uint8 and got["data"].tolist() == [[0, 1, 2], [3, 4, 5]]
    # protocol 2 stores bytes as _codecs.encode(text, "latin1"); no other codec is admitted
    (tmp_path / "rot").write_bytes(pickle.dumps(b"ab", protocol=2).replace(b"latin1", b"rot_13"))
    with pytest.raises(pickle.UnpicklingError, match="rot_13"):
        load(tmp_path / "rot")


def write_mnist1d_cache(root: Path, name: str = "mnist1d_5000_seed42.pt", **change) -> Path:
    """A small cache in the format mnist1d.py writes (100 train / 20 test signals), edited."""
    g = torch.Generator().manual_seed(0)
    blob = {"x": torch.randn(100, 1, 40, generator=g), "y": torch.arange(100) % 10,
            "x_test": torch.randn(20, 1, 40, generator=g), "y_test": torch.arange(20) % 10, **change}
    root.mkdir(parents=True, exist_ok=True)
    torch.save(blob, root / name)
    return root / name


def test_a_sound_small_mnist1d_cache_is_used(tmp_path):
    write_mnist1d_cache(tmp_path)
    d = load_data(data_cfg(root=str(tmp_path), val_fraction=0.0), seed=0)
    assert d.x_train.shape == (100, 1, 40) and d.num_classes == 10


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


_X = torch.zeros(100, 1, 40)


@pytest.mark.parametrize("change, needle", [
    ({"x": _with(_with(_X, (3, 0, 5), float("nan")), (7, 0, 0), float("inf"))},
     "2 values of x are NaN or infinite; delete the file to regenerate it"),
    ({"y": _with(torch.arange(100) % 10, 4, 12)}, "labels must be in [0, 10), found 12"),
    ({"x_test": torch.zeros(20, 1, 39)}, "x_test must be a float tensor of shape (N, 1, 40), found "
                                         "torch.float32 of shape (20, 1, 39)"),
    ({"y_test": torch.arange(19) % 10}, "19 labels y_test for 20 inputs x_test"),
])
def test_damaged_mnist1d_cache_is_refused_before_training(cli, tmp_path, change, needle):
    path = write_mnist1d_cache(tmp_path / "data", **change)
    proc = cli(run_args(tmp_path, tmp_path / "data"), check=False)
    assert_refused(proc, f"error: {path}: ", needle)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_mnist1d_cache_holding_a_pickle_payload_is_refused(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = write_mnist1d_cache(tmp_path / "data", x=Payload(marker))
    proc = cli(run_args(tmp_path, tmp_path / "data"), check=False)
    assert not marker.exists()
    assert_refused(proc, f"error: {path}: refused to load this MNIST-1D cache")


def test_mnist_label_out_of_range_names_the_label_file(tmp_path):
    write_mnist(tmp_path, "MNIST")
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    write_idx(labels, np.where(np.arange(60) == 5, 200, np.arange(60) % 10))
    with pytest.raises(ConfigError, match=re.escape(f"{labels}: labels must be in [0, 10), found 200")):
        load_data(data_cfg(name="mnist", root=str(tmp_path), download=False), seed=0)


def test_data_root_that_is_a_file_is_refused(cli, tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    proc = cli(run_args(tmp_path, f), check=False)
    assert_refused(proc, f"error: data.root={f} is a file: expected a folder")
    # A folder below a file cannot be created: said before generating anything.
    with pytest.raises(ConfigError, match=re.escape(f"data.root={f}/sub cannot be created: {f} is a file")):
        load_data(data_cfg(root=str(f / "sub")), seed=0)


def test_unwritable_data_root_is_refused_before_generating_or_downloading(tmp_path, monkeypatch):
    from regexp.data import checks, mnist1d

    def no_generation(*a):
        raise AssertionError("generated data although data.root is not writable")

    monkeypatch.setattr(mnist1d, "_generate", no_generation)
    # Tests run as root, for whom every folder is writable: play a user who may not write here.
    real = os.access
    monkeypatch.setattr(checks.os, "access", lambda p, mode: Path(p) != tmp_path and real(p, mode))
    with pytest.raises(ConfigError, match=re.escape(f"data.root={tmp_path / 'new'} is not writable "
                                                    f"({tmp_path} is read-only for this user) and MNIST-1D")):
        load_data(data_cfg(root=str(tmp_path / "new")), seed=0)
    with pytest.raises(ConfigError, match=r"is not writable .* data=cifar10 must be downloaded there"):
        load_data(data_cfg(name="cifar10", root=str(tmp_path), download=True), seed=0)
    # Nothing to write: a read-only folder that holds the files is fine.
    write_mnist1d_cache(tmp_path)
    assert load_data(data_cfg(root=str(tmp_path)), seed=0).x_test.shape == (20, 1, 40)

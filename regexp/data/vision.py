"""torchvision image datasets: MNIST, FashionMNIST, CIFAR-10.

Files are looked for under ``<data.root>/<folder>`` and downloaded there when
``data.download`` is true and a network exists. Images become float tensors in [0, 1],
standardized per channel with the training set's mean and std.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from regexp.data import register_source, safe_pickle
from regexp.data.checks import check_tensors, check_writable, data_root
from regexp.errors import ConfigError

NUM_CLASSES = 10  # all three datasets
_FIX = "replace it with the published data, or delete it and download again (data.download=true)"
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
# name -> (torchvision class name, folder it reads, files it needs there)
_INFO = {
    "mnist": ("MNIST", "MNIST/raw", _MNIST_FILES),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES),
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")),
}


def _dataset_class(name: str):
    import torchvision.datasets as tvd

    cls = getattr(tvd, _INFO[name][0])
    if name != "cifar10":
        return cls  # MNIST's idx files are raw bytes; its legacy .pt files load weights-only

    class CIFAR10(cls):
        """torchvision's CIFAR10, reading its pickles with :mod:`regexp.data.safe_pickle`.

        torchvision's ``__init__`` and ``_load_meta`` call plain ``pickle.load`` on the files,
        which runs any code a crafted file names; both are redone here without it.
        """

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            super(cls, self).__init__(root)  # VisionDataset's, skipping torchvision's loading
            self.train = train
            if download:
                self.download()
            if not self._check_integrity():
                raise RuntimeError("Dataset not found or corrupted")
            data, self.targets = [], []
            for file_name, _ in self.train_list if train else self.test_list:
                entry = safe_pickle.load(os.path.join(self.root, self.base_folder, file_name))
                data.append(entry["data"])
                self.targets.extend(entry["labels"])
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
            self._load_meta()

        # torchvision checks the published MD5 sums, which only the full files match. A
        # file that is present but damaged still fails above, when it is unpickled.
        def _check_integrity(self) -> bool:
            base = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(base, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            self.classes = safe_pickle.load(path)[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return CIFAR10


def _to_tensors(ds):
    data = ds.data
    x = torch.as_tensor(np.asarray(data)).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return x.contiguous(), y


def load_torchvision(name: str, cfg):
    root = data_root(cfg)
    cls_name, folder, files = _INFO[name]
    cls = _dataset_class(name)
    where = root / folder
    if cfg.download and not all((where / f).is_file() for f in files):
        check_writable(root, f"data={name} must be downloaded there (data.download=true)")
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=False)
        x, y = _to_tensors(train)
        x_test, y_test = _to_tensors(test)
    except ConfigError:
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        if where.is_dir() and any(where.iterdir()):
            problem = f"the files under {where} are corrupt or truncated ({reason})"
        elif cfg.download:
            problem = f"no files under {where} and the download failed ({reason})"
        else:
            problem = f"no files under {where} (data.download=false)"
        raise ConfigError(f"data={name}: {problem}. Put {', '.join(files)} in {where}, or set data.root "
                          f"to the folder that holds {folder}") from None
    # Name the file a bad value came from where the format keeps inputs and labels apart.
    names = [str(where / f) for f in files] if files is _MNIST_FILES else [str(where)] * 4
    check_tensors((x, y, x_test, y_test), names, NUM_CLASSES, _FIX)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std, y, (x_test - mean) / std, y_test


for _name in _INFO:
    register_source(_name)(lambda cfg, _n=_name: load_torchvision(_n, cfg))

"""torchvision image datasets: MNIST, FashionMNIST, CIFAR-10.

Files are looked for under ``<data.root>/<folder>`` and downloaded there when
``data.download`` is true and a network exists. Images become float tensors in [0, 1],
standardized per channel with the training set's mean and std.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from regexp.data import register_source
from regexp.errors import ConfigError

# name -> (torchvision class name, folder it reads, files it needs)
_INFO = {
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", "train-images-idx3-ubyte, "
                      "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "data_batch_1 ... data_batch_5, test_batch, "
                "batches.meta"),
}


def _dataset_class(name: str):
    import torchvision.datasets as tvd

    cls = getattr(tvd, _INFO[name][0])
    if name != "cifar10":
        return cls

    class CIFAR10(cls):
        # torchvision checks the published MD5 sums, which only the full files match. A
        # file that is present but damaged still fails below, when it is unpickled.
        def _check_integrity(self) -> bool:
            base = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(base, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            import pickle

            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return CIFAR10


def _to_tensors(ds):
    data = ds.data
    x = torch.as_tensor(np.asarray(data)).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return x.contiguous(), y


def load_torchvision(name: str, cfg):
    root = Path(os.path.expanduser(cfg.root))
    cls_name, folder, files = _INFO[name]
    cls = _dataset_class(name)
    where = root / folder
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
        raise ConfigError(f"data={name}: {problem}. Put {files} in {where}, or set data.root to the "
                          f"folder that holds {folder}") from None
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std, y, (x_test - mean) / std, y_test


for _name in _INFO:
    register_source(_name)(lambda cfg, _n=_name: load_torchvision(_n, cfg))

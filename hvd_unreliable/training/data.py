"""Data sets that need no download, and per-rank shards of them.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (ships with the package).
* ``cifar10``: CIFAR-10 from a local directory in the standard python-pickle format
  (``data_batch_1..5`` and ``test_batch``), read without torchvision.
* ``synthetic``: a seeded Gaussian-mixture image classification set of any shape
  (e.g. 3x32x32, a CIFAR-like stand-in).

Shards: ``iid`` (a random split) or ``label_skew`` (label proportions per rank drawn from a
Dirichlet(``skew_alpha``); small alpha = very different shards, the papers' large zeta).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from ..config import PARTITIONS
from ..errors import ConfigError, check_choice, check_positive

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, num_classes: int) -> Dataset:
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return Dataset(t(x[tr]), t(y[tr]), t(x[te]), t(y[te]), num_classes)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    data, target = _digits_arrays()
    x = (data.astype(np.float32) / 16.0 - 0.5).reshape(-1, 1, 8, 8)
    return _split(x, target.astype(np.int64), test_fraction, seed, 10)


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (pixel values 0-16 and labels), kept as a NumPy file in the cache
    directory (``HVDU_CACHE``, default ``~/.cache/hvd_unreliable``, as for the Horovod wheel)
    once loaded: importing scikit-learn (and SciPy with it) costs every rank about two seconds
    of CPU, more than the rest of a small run's start. Without a writable cache, every load
    asks scikit-learn."""
    import socket
    from importlib.metadata import PackageNotFoundError, version

    try:
        path = (Path(os.environ.get("HVDU_CACHE", "~/.cache/hvd_unreliable")).expanduser() / "data"
                / f"digits-scikit-learn-{version('scikit-learn')}.npz")
    except PackageNotFoundError:  # not installed: the import below says so
        path = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as f:
                return f["data"], f["target"]
        except (OSError, KeyError, ValueError, EOFError):  # unreadable: loaded and written again
            pass
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    if path is not None:
        try:  # written whole under another name, then renamed: ranks that load at once never see half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, data=d.data, target=d.target)
            os.replace(tmp, path)
        except OSError:
            pass
    return d.data, d.target


def load_cifar10(root: str) -> Dataset:
    """Read CIFAR-10's python-pickle batches from ``root``; never downloads."""
    expected = "a CIFAR-10 python directory holding " + ", ".join(CIFAR_FILES) + " (cifar-10-batches-py)"
    if not root:
        raise ConfigError("data.root", root, expected)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError("data.root", str(path), expected + "; the directory does not exist")
    missing = [f for f in CIFAR_FILES if not (path / f).is_file()]
    if missing:
        raise ConfigError("data.root", str(path), expected + f"; missing {', '.join(missing)}")

    def read(name):
        try:
            with open(path / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:  # unreadable pickle, missing keys, wrong sizes
            raise ConfigError("data.root", str(path / name), f"a CIFAR-10 pickle with b'data' (N x 3072 uint8) "
                                                            f"and b'labels' ({type(e).__name__}: {e})") from None
        if len(labels) != len(data):
            raise ConfigError("data.root", str(path / name), "as many labels as images")
        return data, labels

    parts = [read(f) for f in CIFAR_FILES[:5]]
    xt, yt = read("test_batch")
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
    norm = lambda a: torch.from_numpy((a.astype(np.float32) / 255.0 - mean) / std)
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return Dataset(norm(x), torch.from_numpy(y), norm(xt), torch.from_numpy(yt), 10)


def make_synthetic(num_samples: int, shape: List[int], num_classes: int, seed: int, test_fraction: float,
                   noise: float = 1.0) -> Dataset:
    """Gaussian mixture: one random prototype image per class plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((num_classes, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, num_samples)
    x = protos[y] + noise * rng.standard_normal((num_samples, *shape)).astype(np.float32)
    return _split(x, y.astype(np.int64), test_fraction, seed, num_classes)


def shard_indices(labels: np.ndarray, world_size: int, partition: str, skew_alpha: float, seed: int) -> List[np.ndarray]:
    """Indices of every rank's shard, all of the same size (so every rank runs the same number of steps)."""
    check_choice("data.partition", partition, PARTITIONS)
    rng = np.random.default_rng([seed, 1])
    n = len(labels) // world_size
    if n == 0:
        raise ConfigError("data", f"{len(labels)} training samples", f"at least one sample per rank ({world_size} ranks)")
    if partition == "iid":
        perm = rng.permutation(len(labels))
        return [np.sort(perm[r * n:(r + 1) * n]) for r in range(world_size)]
    check_positive("data.skew_alpha", skew_alpha)  # (smaller = more skewed shards)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    props = rng.dirichlet([skew_alpha] * len(classes), size=world_size)
    shards = []
    for r in range(world_size):  # draw n samples per rank following its label proportions
        want = rng.choice(len(classes), size=n, p=props[r])
        shard = []
        for k in want:
            c = classes[k]
            if not pools[c]:  # class exhausted: take from the largest remaining pool
                c = max(pools, key=lambda q: len(pools[q]))
            shard.append(pools[c].pop())
        shards.append(np.sort(np.array(shard)))
    return shards

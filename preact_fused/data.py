"""CIFAR-10 from its standard python pickle batches, read from disk (never downloaded).

The layout is the one the CIFAR-10 "python version" archive unpacks to::

    cifar-10-batches-py/
        data_batch_1 ... data_batch_5    training set, 10000 images each
        test_batch                       test set, 10000 images
        batches.meta                     class names (not needed here)

Each batch file is a pickled dict with ``b"data"``: uint8 array [N, 3072] (the 1024 red, then green,
then blue values of a 32x32 image, rows first) and ``b"labels"``: N ints in 0..9. Unpickling runs code
from the file, so only read batches from a source you trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
SUBDIR = "cifar-10-batches-py"
# Per-channel mean and standard deviation of the CIFAR-10 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _batch_dir(root: Path) -> Path:
    """``root`` itself, or its ``cifar-10-batches-py`` subfolder when that is where the batches are."""
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {root} does not exist (expected the unpacked "
                                f"python batches: {SUBDIR}/data_batch_1..5, test_batch)")
    nested = root / SUBDIR
    if not (root / TEST_FILES[0]).exists() and nested.is_dir():
        return nested
    return root


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle batch -> (images uint8 [N, 3, 32, 32], labels int64 [N]); ValueError if malformed."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (unpickling failed: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and "
                         f"b'labels', got {keys}")
    data = torch.as_tensor(batch[b"data"])
    labels = torch.as_tensor(batch[b"labels"], dtype=torch.int64)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {tuple(data.shape)}")
    if labels.shape != (data.shape[0],) or (labels.numel() and not 0 <= labels.min() <= labels.max() <= 9):
        raise ValueError(f"{path}: b'labels' must be {data.shape[0]} ints in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 ``split`` ("train": 50000 images, "test": 10000) from the pickle batches under ``root``.

    root: the ``cifar-10-batches-py`` folder or its parent. Returns (images uint8 [N, 3, 32, 32],
    labels int64 [N]). FileNotFoundError names the missing files; ValueError a malformed one.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _batch_dir(Path(root))
    names = TRAIN_FILES if split == "train" else TEST_FILES
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {split} batches missing from {folder}: {', '.join(missing)}")
    parts = [read_batch(folder / name) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W], scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device)[:, None, None]
    std = torch.tensor(STD, device=images.device)[:, None, None]
    return (images.float() / 255 - mean) / std

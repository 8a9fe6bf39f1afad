"""CIFAR-10 / CIFAR-100 from their standard python pickle batches, read from disk (never downloaded).

The layouts are the ones the "python version" archives unpack to::

    cifar-10-batches-py/                      cifar-100-python/
        data_batch_1 ... data_batch_5             train        training set, 50000 images
        test_batch                                test         test set, 10000 images
        batches.meta  (class names; unused)       meta         (class names; unused)

Each batch file is a pickled dict with ``b"data"``: uint8 array [N, 3072] (the 1024 red, then green,
then blue values of a 32x32 image, rows first) and the labels: ``b"labels"`` (CIFAR-10, ints in 0..9)
or ``b"fine_labels"`` (CIFAR-100, ints in 0..99). The files are unpickled with an allow-list (numpy
arrays and plain containers only), so a file cannot run code when it is read.

Also here: the training-time augmentation of the paper (4-pixel zero padding, random 32x32 crop,
random horizontal flip) on uint8 batches, a synthetic stand-in for runs without data, and
``write_batches``, which writes a directory in the same format (tests, tiny experiments).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import torch

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
SUBDIR = "cifar-10-batches-py"
# Per-channel mean and standard deviation of the CIFAR-10 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# The same for CIFAR-100.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Layout(NamedTuple):
    """Where one dataset's batches live and what they hold."""
    subdir: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DATASETS = {
    "cifar10": Layout(SUBDIR, TRAIN_FILES, TEST_FILES, b"labels", 10, MEAN, STD),
    "cifar100": Layout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol 2 spells bytes when written by Python 3
}


class _Unpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only: nothing in a batch file gets to run."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")


def _find(root: Path, dataset: str) -> tuple[Path, str]:
    """(the folder holding the batches, dataset name): ``root`` itself or its standard subfolder.

    dataset: "cifar10", "cifar100" or "auto" (whichever layout is found; CIFAR-10 first).
    """
    names = list(DATASETS) if dataset == "auto" else [dataset]
    for name in names:
        if name not in DATASETS:
            raise ValueError(f"dataset must be 'auto' or one of {sorted(DATASETS)}, got {dataset!r}")
    if not root.is_dir():
        expected = " or ".join(f"{DATASETS[n].subdir}/ ({', '.join(DATASETS[n].train + DATASETS[n].test)})"
                               for n in names)
        raise FileNotFoundError(f"CIFAR directory {root} does not exist (expected the unpacked python "
                                f"batches: {expected})")
    for name in names:
        layout = DATASETS[name]
        for folder in (root, root / layout.subdir):
            if (folder / layout.test[0]).is_file() or (folder / layout.train[0]).is_file():
                return folder, name
    if dataset != "auto":
        return (root / DATASETS[dataset].subdir if (root / DATASETS[dataset].subdir).is_dir() else root), dataset
    found = sorted(p.name for p in root.iterdir())[:10]
    raise FileNotFoundError(
        f"no CIFAR python batches in {root}: expected {SUBDIR}/ (data_batch_1..5, test_batch) or "
        f"cifar-100-python/ (train, test), or those files directly; found {found or 'an empty folder'}")


def _batch_dir(root: Path) -> Path:
    """``root`` itself, or its ``cifar-10-batches-py`` subfolder when that is where the batches are."""
    return _find(root, "cifar10")[0]


def read_batch(path: Path, label_key: bytes = b"labels", num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle batch -> (images uint8 [N, 3, 32, 32], labels int64 [N]); ValueError if malformed."""
    try:
        with open(path, "rb") as f:
            batch = _Unpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a CIFAR python batch (unpickling failed: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR python batch: expected a dict with b'data' and "
                         f"{label_key!r}, got {keys}")
    try:
        data = torch.as_tensor(batch[b"data"])
        labels = torch.as_tensor(batch[label_key], dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: b'data' / {label_key!r} are not arrays: {err}") from err
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {tuple(data.shape)}")
    if labels.shape != (data.shape[0],) or (labels.numel() and not 0 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(f"{path}: {label_key!r} must be {data.shape[0]} ints in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(root, split: str = "train", dataset: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """One split of CIFAR-10 or CIFAR-100 from the pickle batches under ``root``.

    root: the batch folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.
    dataset: "cifar10", "cifar100" or "auto" (detected from the files). Returns (images uint8
    [N, 3, 32, 32], labels int64 [N], dataset name). FileNotFoundError names what is missing;
    ValueError a malformed file.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder, name = _find(Path(root), dataset)
    layout = DATASETS[name]
    names = layout.train if split == "train" else layout.test
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{name} {split} batches missing from {folder}: {', '.join(missing)}")
    parts = [read_batch(folder / n, layout.label_key, layout.num_classes) for n in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), name


def load_cifar10(root, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 ``split`` ("train": 50000 images, "test": 10000) from the pickle batches under ``root``.

    root: the ``cifar-10-batches-py`` folder or its parent. Returns (images uint8 [N, 3, 32, 32],
    labels int64 [N]). FileNotFoundError names the missing files; ValueError a malformed one.
    """
    images, labels, _ = load_cifar(root, split, "cifar10")
    return images, labels


def normalize(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W], scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(mean, device=images.device)[:, None, None]
    std = torch.tensor(std, device=images.device)[:, None, None]
    return (images.float() / 255 - mean) / std


def synthetic(num_images: int, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped data: (images uint8 [N, 3, 32, 32], labels int64 [N]), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return images, torch.randint(0, num_classes, (num_images,), generator=gen)


def augmentation_plan(num_images: int, generator: torch.Generator, pad: int = 4):
    """Per-image random crop offsets [N, 2] in 0..2*pad and horizontal flips [N] (bool)."""
    offsets = torch.randint(0, 2 * pad + 1, (num_images, 2), generator=generator)
    flips = torch.rand(num_images, generator=generator) < 0.5
    return offsets, flips


def augment(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Pad by ``pad`` zero pixels, crop at ``offsets``, flip where ``flips``: the paper's augmentation.

    images: uint8 (or float) [B, C, H, W]; offsets: [B, 2] (row, column) in 0..2*pad; flips: [B] bool.
    Returns [B, C, H, W] like images.
    """
    b, c, h, w = images.shape
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = torch.arange(b, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def write_batches(root, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                  dataset: str = "cifar10") -> Path:
    """Write (images uint8 [N, 3, 32, 32], labels [N]) splits as the standard pickle batches.

    Creates ``root/<subdir>`` (``cifar-10-batches-py`` or ``cifar-100-python``); the training images
    are spread over the dataset's training files. Returns that folder. Needs numpy (the format's arrays).
    """
    import numpy as np

    layout = DATASETS[dataset]
    folder = Path(root) / layout.subdir
    folder.mkdir(parents=True, exist_ok=True)
    for names, (images, labels) in ((layout.train, train), (layout.test, test)):
        for name, index in zip(names, torch.arange(len(images)).tensor_split(len(names))):
            x, y = images[index], labels[index]
            batch = {b"batch_label": name.encode(), b"data": np.ascontiguousarray(x.reshape(len(x), -1).numpy()),
                     layout.label_key: [int(v) for v in y], b"filenames": [b"%d.png" % i for i in range(len(x))]}
            if dataset == "cifar100":
                batch[b"coarse_labels"] = [int(v) // 5 for v in y]
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    return folder

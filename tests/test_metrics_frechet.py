"""Fréchet distance against closed forms and scipy's sqrtm; FD-MNIST's FID-style sanity properties and cache."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from gradconflict.metrics import (ClassifierConfig, FDResult, fd_mnist, fd_mnist_features, frechet_distance,
                                  gaussian_stats, mnist_split)
fd_module = importlib.import_module("gradconflict.metrics.fd_mnist")  # the package's fd_mnist is the function


def scipy_frechet(mu1, cov1, mu2, cov2) -> float:
    """Independent reference: the textbook formula with scipy's general matrix square root of C1 C2."""
    with warnings.catch_warnings():  # singular products (dead features) are fine for the trace
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov1 @ cov2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root).real)


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


# ---------------------------------------------------------------- the Fréchet distance
@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)])
def test_one_dimensional_closed_form(m1, s1, m2, s2):
    expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
    assert frechet_distance(m1, s1**2, m2, s2**2) == pytest.approx(expected, abs=1e-12)
    assert frechet_distance([m1], [[s1**2]], [m2], [[s2**2]]) == pytest.approx(expected, abs=1e-12)


def test_commuting_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("d", [2, 5, 20, 64])
def test_matches_scipy_sqrtm_on_random_gaussians(d):
    rng = np.random.default_rng(d)
    c1, c2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(scipy_frechet(mu1, c1, mu2, c2), rel=1e-9, abs=1e-9)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-10)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9 * np.trace(c1))


def test_singular_covariances_stay_real_and_match_scipy():
    rng = np.random.default_rng(3)
    c1, c2 = random_spd(rng, 12, rank=4), random_spd(rng, 12, rank=6)  # fewer samples than features
    value = frechet_distance(np.zeros(12), c1, np.zeros(12), c2)
    assert np.isfinite(value) and value >= 0
    assert value == pytest.approx(scipy_frechet(np.zeros(12), c1, np.zeros(12), c2), rel=1e-6, abs=1e-6)


def test_gaussian_stats_match_numpy_and_recover_a_known_distance():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 6))
    mu, cov = gaussian_stats(torch.from_numpy(x).float())
    assert mu.dtype == np.float64 and cov.shape == (6, 6)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)
    # samples of N(0, I) and N(m, 4 I) in d = 3: FD = ||m||^2 + d (2 - 1)^2
    a = rng.standard_normal((200_000, 3))
    b = 2 * rng.standard_normal((200_000, 3)) + np.array([1.0, -1.0, 0.5])
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(2.25 + 3.0, rel=0.02)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "cov1 must have shape"),
    ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "different dimensions"),
    ((np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), "not symmetric"),
    ((np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2)), "NaN or Inf"),
])
def test_frechet_refuses_bad_statistics(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_gaussian_stats_refuses_bad_features():
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        gaussian_stats(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(np.zeros((1, 3)))


# ---------------------------------------------------------------- FD-MNIST
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fd_cache")


@pytest.fixture(scope="module")
def extractor(cache):
    return fd_mnist_features(16, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def held_out():
    images, labels = mnist_split("held_out", 16)
    return images, labels


def test_classifier_is_accurate_and_never_saw_the_held_out_split(extractor, held_out):
    train_images, _ = mnist_split("train", 16)
    assert extractor.accuracy >= 0.93  # measured on the 1000 held-out digits
    assert extractor.dim == 64 and extractor(held_out[0][:10]).shape == (10, 64)
    flat_train = {bytes(row) for row in train_images.flatten(1).numpy()}
    assert not any(bytes(row) in flat_train for row in held_out[0].flatten(1).numpy())


def test_real_vs_real_is_small_and_noise_is_large(extractor, held_out):
    images = held_out[0]
    real = fd_mnist(images[:500], images[500:], extractor=extractor)  # both halves hold 50 of every digit
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = fd_mnist(noise, images[500:], extractor=extractor)
    assert isinstance(real, FDResult) and (real.n_samples, real.n_reference, real.draws) == (500, 500, 5)
    assert real.value < 15 and fake.value > 300 and fake.value > 30 * real.value
    for result in (real, fake):
        assert np.isfinite(result.stderr) and result.stderr > 0


def test_value_matches_scipy_on_the_features(extractor, held_out):
    images = held_out[0]
    fa, fb = extractor(images[:400]).double().numpy(), extractor(images[400:]).double().numpy()
    reference = scipy_frechet(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert fd_mnist(images[:400], images[400:], extractor=extractor).value == pytest.approx(reference, rel=1e-5)


def test_fd_grows_with_added_noise(extractor, held_out):
    images = held_out[0]
    noise = torch.randn(500, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    values = [fd_mnist((images[:500] + level * noise).clamp(-1, 1), images[500:], extractor=extractor, draws=2).value
              for level in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_stderr_is_deterministic_given_the_generator(extractor, held_out):
    images = held_out[0]
    one = fd_mnist(images[:300], images[500:], extractor=extractor, generator=torch.Generator().manual_seed(7))
    two = fd_mnist(images[:300], images[500:], extractor=extractor, generator=torch.Generator().manual_seed(7))
    assert one == two


def test_cache_gives_identical_features_without_training(extractor, cache, held_out, monkeypatch):
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"fd_mnist-{extractor.key}.pt"]  # the atomic write left no temporary file
    monkeypatch.setattr(fd_module, "train_classifier", lambda *a, **k: pytest.fail("trained again despite the cache"))
    again = fd_mnist_features(16, cache_dir=cache)
    assert again.accuracy == extractor.accuracy
    assert torch.equal(again(held_out[0][:50]), extractor(held_out[0][:50]))


def test_cache_key_follows_the_settings(cache, monkeypatch):
    monkeypatch.setenv("GRADCONFLICT_CACHE", str(cache))
    assert fd_module.default_cache_dir() == cache
    data = fd_module.fingerprint(list(mnist_split("train", 16)))
    keys = {fd_module._cache_key(ClassifierConfig(**kw), data) for kw in ({}, {"epochs": 3}, {"seed": 1}, {"image_size": 8})}
    assert len(keys) == 4


def test_a_corrupt_cache_file_is_replaced(tmp_path, held_out):
    config = ClassifierConfig(epochs=1)
    first = fd_mnist_features(16, cache_dir=tmp_path, config=config, progress=False)
    first.path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="ignoring the FD-MNIST cache file"):
        second = fd_mnist_features(16, cache_dir=tmp_path, config=config, progress=False)
    assert torch.equal(first(held_out[0][:20]), second(held_out[0][:20]))  # seeded training: the same weights


@pytest.mark.parametrize("bad, match", [
    (torch.full((200, 1, 16, 16), float("nan")), "NaN or Inf"),
    (torch.zeros(200, 16, 16), "without a channel axis"),
    (torch.zeros(200, 3, 16, 16), "must have shape \\(N, 1, 16, 16\\)"),
    (torch.zeros(200, 1, 28, 28), "must have shape"),
    (torch.zeros(200, 1, 16, 16, dtype=torch.uint8), "dtype"),
    (torch.zeros(100, 1, 16, 16), "at least 128 samples"),
])
def test_fd_mnist_refuses_bad_samples(extractor, held_out, bad, match):
    with pytest.raises(ValueError, match=match):
        fd_mnist(bad, held_out[0], extractor=extractor)


def test_fd_mnist_refuses_too_few_draws(extractor, held_out):
    with pytest.raises(ValueError, match="draws must be an integer >= 2"):
        fd_mnist(held_out[0][:500], held_out[0][500:], extractor=extractor, draws=1)


def test_default_extractor_comes_from_the_env_cache(extractor, cache, held_out, monkeypatch):
    monkeypatch.setenv("GRADCONFLICT_CACHE", str(cache))
    monkeypatch.setattr(fd_module, "train_classifier", lambda *a, **k: pytest.fail("trained again despite the cache"))
    images = held_out[0]
    assert fd_mnist(images[:200], images[500:]) == fd_mnist(images[:200], images[500:], extractor=extractor)

"""``--scale`` on every command that reads data, and input shapes: data of the model's (H, W) (non-square latents
included) are read as stored, another size only with ``--image-size``, and nothing is ever stretched."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gradconflict.cli import build_parser
from gradconflict.data import images_to_tensor
from gradconflict.spec import model_data


def _model(size, channels: int = 1) -> SimpleNamespace:
    """Stand-in for a model: ``model_data`` reads only its config (image_size or diffusers' sample_size)."""
    return SimpleNamespace(config={"sample_size": size, "in_channels": channels})


@pytest.mark.parametrize("command", ["gram", "track", "transfer", "bins", "train"])
def test_every_data_command_takes_scale(command: str) -> None:
    required = {"gram": ["--model", "m", "--out", "o"], "track": ["--model", "m", "--checkpoints", "c", "--out", "o"],
                "transfer": ["--model", "m", "--out", "o"], "bins": ["--model", "m", "--out", "o"],
                "train": ["--out", "o"]}[command]
    parser = build_parser()
    args = parser.parse_args([command, *required, "--scale", "minmax"])
    assert args.scale == "minmax"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *required, "--scale", "bogus"])


def test_scale_reaches_the_data_closed_form(tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(0.5, 5.0, (4, 1, 8, 8)).astype(np.float32)  # not images: kept by auto
    np.save(tmp_path / "x.npy", x)
    auto, size = model_data(_model(8), str(tmp_path / "x.npy"), None)
    assert size == 8 and np.array_equal(auto.images.numpy(), x)
    assert np.array_equal(model_data(_model(8), str(tmp_path / "x.npy"), None, scale="none")[0].images.numpy(), x)
    mm = model_data(_model(8), str(tmp_path / "x.npy"), None, scale="minmax")[0].images.numpy()
    np.testing.assert_allclose(mm, 2 * (x - x.min()) / (x.max() - x.min()) - 1, atol=1e-6)


def test_non_square_latents_are_read_as_stored(tmp_path: Path) -> None:
    lat = np.random.default_rng(1).standard_normal((3, 4, 8, 12)).astype(np.float32)
    np.savez(tmp_path / "lat.npz", images=lat)
    data, size = model_data(_model((8, 12), 4), str(tmp_path / "lat.npz"), None)
    assert size == (8, 12) and np.array_equal(data.images.numpy(), lat)
    data, size = model_data(SimpleNamespace(config=None), str(tmp_path / "lat.npz"), None)  # no declared size
    assert size == (8, 12) and np.array_equal(data.images.numpy(), lat)


def test_other_sizes_need_image_size_and_are_never_stretched(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.save(tmp_path / "big.npy", rng.uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32))
    with pytest.raises(ValueError, match=r"holds 16 x 16 images but the model takes 8 x 8: pass --image-size 8"):
        model_data(_model(8), str(tmp_path / "big.npy"), None)
    data, size = model_data(_model(8), str(tmp_path / "big.npy"), 8)
    assert size == 8 and tuple(data.images.shape) == (3, 1, 8, 8)
    np.save(tmp_path / "wide.npy", rng.uniform(-1, 1, (3, 1, 8, 12)).astype(np.float32))
    with pytest.raises(ValueError, match="would stretch them"):
        model_data(_model(8), str(tmp_path / "wide.npy"), 8)
    with pytest.raises(ValueError, match="holds 8 x 12 images but the model takes 8 x 8: pass --image-size 8"):
        model_data(_model(8), str(tmp_path / "wide.npy"), None)
    with pytest.raises(ValueError, match="never resized to a non-square size"):
        model_data(_model((4, 6)), str(tmp_path / "wide.npy"), None)
    with pytest.raises(ValueError, match="--image-size 8 resizes to squares"):
        model_data(_model((8, 12)), str(tmp_path / "wide.npy"), 8)
    with pytest.raises(ValueError, match="non-square 8 x 12 inputs but 'synthetic' holds square images"):
        model_data(_model((8, 12)), "synthetic", None)
    with pytest.raises(ValueError, match="6 x 10 .* would stretch them"):
        images_to_tensor(np.zeros((2, 1, 6, 10), np.float32), 8)
    assert tuple(images_to_tensor(torch.zeros(2, 1, 6, 10), None).shape) == (2, 1, 6, 10)

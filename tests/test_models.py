"""Built-in models: shapes, per-sample independence, attention through F.scaled_dot_product_attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradconflict.models import MODEL_NAMES, build_model, model_from_spec, model_spec, model_summary, timestep_embedding

TINY = ["dit-tiny", "unet-tiny"]


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter: zero-initialised output layers would otherwise hide all behaviour."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def inputs(model, n=4, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c.in_channels, c.image_size, c.image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape_and_finite(name, num_classes):
    model = randomize(build_model(name, num_classes=num_classes))
    x, t = inputs(model)
    y = torch.tensor([0, 3, -1, 9]) if num_classes else None
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert model(x, 500).shape == x.shape  # scalar timestep broadcasts
    if num_classes:
        assert model(x, t).shape == x.shape  # y=None -> null class
        assert not torch.allclose(model(x, t, torch.tensor([1, 1, 1, 1])), model(x, t, torch.tensor([2, 2, 2, 2])))


@pytest.mark.parametrize("name", TINY)
def test_other_shapes_and_channels(name):
    model = randomize(build_model(name, image_size=32, in_channels=3))
    x, t = inputs(model, n=2)
    assert model(x, t).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", TINY)
def test_zero_init_output(name):
    """adaLN-Zero / zero-initialised output conv: a fresh model outputs exactly 0."""
    model = build_model(name)
    x, t = inputs(model)
    assert torch.count_nonzero(model(x, t)) == 0


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_samples_do_not_interact(name, mode):
    model = randomize(build_model(name, num_classes=4))
    model.train(mode == "train")
    x, t = inputs(model, n=5)
    y = torch.tensor([0, 1, 2, 3, -1])
    ref = model(x, t, y)[0]
    x2, t2, y2 = x.clone(), t.clone(), y.clone()
    x2[1:] = torch.randn_like(x2[1:]) * 3
    t2[1:] = (t2[1:] + 123) % 1000
    y2[1:] = torch.tensor([3, 2, 1, 0])
    out = model(x2, t2, y2)
    assert torch.allclose(out[0], ref, atol=1e-6, rtol=0)
    single = model(x[:1], t[:1], y[:1])[0]
    assert torch.allclose(single, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out[1:], model(x, t, y)[1:])


@pytest.mark.parametrize("name,expected", [("dit-tiny", 3), ("unet-tiny", 7)])
def test_attention_goes_through_F_sdpa(monkeypatch, name, expected):
    """Patching torch.nn.functional.scaled_dot_product_attention reaches every attention layer."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = randomize(build_model(name))
    x, t = inputs(model)
    model(x, t).sum().backward()
    assert len(calls) == expected  # dit-tiny: depth 3; unet-tiny: 2 down + 1 mid + 4 up (8 and 4 px)
    assert all(p.grad is not None for p in model.parameters())


def test_no_batchnorm_or_inplace_activations():
    for name in TINY:
        model = build_model(name)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_parameter_counts():
    counts = {name: model_summary(build_model(name))["parameters"] for name in MODEL_NAMES}
    assert counts["dit-tiny"] < 300_000 and counts["unet-tiny"] < 300_000
    assert 25e6 < counts["dit-s"] < 40e6 and 20e6 < counts["unet-s"] < 40e6
    summary = model_summary(build_model("dit-tiny"))
    assert summary["arch"] == "dit" and summary["trainable"] == summary["parameters"]
    assert sum(v for k, v in summary.items() if k.startswith("params.")) == summary["parameters"]


def test_config_and_spec_roundtrip():
    model = randomize(build_model("unet-tiny", prediction="v_prediction", num_classes=3))
    assert model.config.prediction == "v" and model.config.num_classes == 3
    clone = model_from_spec(model_spec(model))
    clone.load_state_dict(model.state_dict())
    x, t = inputs(model)
    assert torch.equal(clone(x, t), model(x, t))


def test_bad_names_and_fields():
    with pytest.raises(ValueError, match="dit-tiny"):
        build_model("resnet")
    with pytest.raises(ValueError, match="no field"):
        build_model("dit-tiny", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        build_model("dit-tiny", image_size=15)
    with pytest.raises(ValueError):
        build_model("dit-tiny", prediction="score")


def test_timestep_embedding_formula():
    emb = timestep_embedding(torch.tensor([1, 0]), 4)
    # h = 2 frequencies: 1 and 10000^(-1/2) = 0.01
    expected = torch.tensor([[math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)], [1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(emb, expected, atol=1e-6)

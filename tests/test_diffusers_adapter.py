"""The diffusers adapter: losses equal diffusers' own ``add_noise`` / ``get_velocity``, schedules equal
``alphas_cumprod``, fused Gram == loop Gram, and loading errors name the problem. Tiny models, no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from gradconflict.adapters import DiffusersModel, load_diffusers  # noqa: E402
from gradconflict.engine import per_sample_losses, task_gram  # noqa: E402
from gradconflict.spec import load_model  # noqa: E402

F64 = torch.float64
T_BATCH = torch.tensor([3, 40, 400, 450, 800, 999])
TASK = torch.tensor([0, 0, 1, 1, 2, 2])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` (Frobenius)."""
    return float((a - b).norm() / b.norm())


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(F64)


def _dit() -> torch.nn.Module:
    """Class-conditional DiT with learned sigma: 2 input channels, 4 output channels, 5 classes (+ null)."""
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                           num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5).to(F64)


def _pipeline(root: Path, model: torch.nn.Module, prediction_type: str, sub: str = "unet") -> Path:
    """Save ``model`` and a DDPM scheduler in diffusers' pipeline layout ``root/{sub,scheduler}``."""
    model.save_pretrained(root / sub)
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return root


def _batch(channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, channels, 8, 8, generator=g, dtype=F64)
    return x0, torch.randn(x0.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("prediction_type, short", [("epsilon", "eps"), ("v_prediction", "v")])
def test_loss_equals_diffusers_own_noising(tmp_path: Path, prediction_type: str, short: str) -> None:
    """``l_i = mean (y_i - f(x_t, t))^2`` with ``x_t = scheduler.add_noise(x0, eps, t)`` and ``y = eps`` or
    ``y = scheduler.get_velocity(x0, eps, t) = alpha_t eps - sigma_t x0``."""
    path = _pipeline(tmp_path, _unet(), prediction_type)
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler")
    x0, noise = _batch()
    by_fn = load_diffusers(path, dtype=F64)
    by_spec = load_model("diffusers:" + str(path))
    by_spec.model.to(F64)
    for loaded in (by_fn, by_spec):
        assert loaded.prediction == short and isinstance(loaded.model, DiffusersModel)
        got = per_sample_losses(loaded.model, x0, T_BATCH, noise, loaded.schedule, prediction=loaded.prediction,
                                loss_space=loaded.prediction)
        x_t = scheduler.add_noise(x0, noise, T_BATCH)
        target = noise if short == "eps" else scheduler.get_velocity(x0, noise, T_BATCH)
        with torch.no_grad():
            out = loaded.model.model(x_t, T_BATCH).sample
        want = (out - target).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=0)


def test_schedule_equals_alphas_cumprod(tmp_path: Path) -> None:
    path = _pipeline(tmp_path, _unet(), "epsilon")
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler")
    schedule = load_diffusers(path).schedule
    torch.testing.assert_close(torch.tensor(schedule.alphas_cumprod), scheduler.alphas_cumprod.to(F64), rtol=0, atol=0)


def test_unet_fused_equals_loop(tmp_path: Path) -> None:
    loaded = load_diffusers(_pipeline(tmp_path, _unet(), "v_prediction"), dtype=F64)
    assert next(loaded.model.parameters()).dtype == F64
    x0, noise = _batch()
    kw = dict(schedule=loaded.schedule, prediction=loaded.prediction, loss_space=loaded.prediction, noise=noise)
    ref = task_gram(loaded.model, x0, T_BATCH, TASK, method="loop", **kw)
    got = task_gram(loaded.model, x0, T_BATCH, TASK, **kw)
    assert _rel(got.gram, ref.gram) <= 1e-10
    torch.testing.assert_close(got.cosine(), ref.cosine(), rtol=0, atol=1e-10)


def test_dit_learned_sigma_shape_and_fused_equals_loop(tmp_path: Path) -> None:
    path = _pipeline(tmp_path, _dit(), "epsilon", sub="transformer")
    loaded = load_diffusers(path, dtype=F64)
    cfg = loaded.model.config
    assert (cfg.in_channels, cfg.out_channels, cfg.num_classes, cfg.null_label, cfg.image_size) == (2, 4, 5, 5, 8)
    x0, noise = _batch(channels=2)
    y = torch.tensor([0, 1, -1, 4, 2, 3])  # -1: no label -> the null class
    assert loaded.model(x0, T_BATCH, y=y).shape == x0.shape
    assert loaded.model(x0, T_BATCH).shape == x0.shape  # y=None: all null class
    kw = dict(schedule=loaded.schedule, prediction=loaded.prediction, loss_space="eps", noise=noise, model_kwargs={"y": y})
    ref = task_gram(loaded.model, x0, T_BATCH, TASK, method="loop", **kw)
    got = task_gram(loaded.model, x0, T_BATCH, TASK, **kw)
    assert _rel(got.gram, ref.gram) <= 1e-10
    torch.testing.assert_close(got.cosine(), ref.cosine(), rtol=0, atol=1e-10)
    for bad in (5, 7):  # 5 would silently be the null class, 7 an index error deep in the model
        with pytest.raises(ValueError, match=f"has 5 classes .* got label {bad}"):
            loaded.model(x0, T_BATCH, y=torch.tensor([0, 1, 2, 3, 4, bad]))


def test_legacy_transformer2d_is_wrapped() -> None:
    torch.manual_seed(0)
    net = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                       num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                       norm_type="ada_norm_zero", norm_elementwise_affine=False).to(F64)
    model = DiffusersModel(net)
    x0, _ = _batch(channels=2)
    assert model.config.conditional and model(x0, T_BATCH, y=torch.arange(6) % 5).shape == x0.shape


def test_model_folder_with_sibling_scheduler_and_checkpoint(tmp_path: Path) -> None:
    unet = _unet()
    path = _pipeline(tmp_path, unet, "epsilon")
    for p in unet.parameters():
        p.data.add_(0.5)
    torch.save(unet.state_dict(), tmp_path / "weights.pt")  # the bare diffusers keys, no "model." prefix
    loaded = load_model("diffusers:" + str(path / "unet"), tmp_path / "weights.pt")
    assert loaded.prediction == "eps"
    torch.testing.assert_close(loaded.model.model.conv_in.weight, unet.conv_in.weight.float())


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("diffusers:" + str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unet/"):
        load_diffusers(tmp_path / "empty")
    _unet().save_pretrained(tmp_path / "lonely" / "unet")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_diffusers(tmp_path / "lonely")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers(tmp_path / "lonely", subfolder="transformer")
    with pytest.raises(ValueError, match="unconditional"):
        DiffusersModel(_unet())(_batch()[0], T_BATCH, y=torch.zeros(6, dtype=torch.long))


def test_diffusers_not_imported_with_gradconflict() -> None:
    code = "import sys, gradconflict, gradconflict.adapters, gradconflict.spec; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

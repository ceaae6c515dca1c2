"""Per-sample conditioning in data files (text embeddings, attention masks) and the diffusers text-conditioned
adapter: rows stay with their images, bad shapes are refused by name, and ``gradconflict gram`` on a saved
UNet2DConditionModel equals an independent float64 autograd loop. Tiny random-weight models, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradconflict.bins import TimestepBins
from gradconflict.cli import main
from gradconflict.data import load_dataset
from gradconflict.engine import sample_task_batch

F64 = torch.float64
N, L, D = 6, 5, 8


def _cond_npz(path: Path, seed: int = 0, hw: tuple[int, int] = (8, 8)) -> dict[str, np.ndarray]:
    """Latents (N, 4, H, W) with std 1.5 (kept as stored), embeddings (N, L, D) and a mask (N, L) hiding a tail."""
    rng = np.random.default_rng(seed)
    arrays = {"images": (rng.standard_normal((N, 4, *hw)) * 1.5).astype(np.float32),
              "encoder_hidden_states": rng.standard_normal((N, L, D)).astype(np.float32),
              "encoder_attention_mask": (np.arange(L)[None, :] < rng.integers(2, L + 1, size=(N, 1))).astype(np.float32)}
    np.savez(path, **arrays)
    return arrays


def test_npz_conditioning_rows_follow_their_images(tmp_path: Path) -> None:
    arrays = _cond_npz(tmp_path / "c.npz")
    data = load_dataset(tmp_path / "c.npz", image_size=None, limit=4)
    assert sorted(data.conditioning) == ["encoder_attention_mask", "encoder_hidden_states"]
    np.testing.assert_array_equal(data.images.numpy(), arrays["images"][:4])  # latents: values as stored
    np.testing.assert_array_equal(data.conditioning["encoder_hidden_states"].numpy(), arrays["encoder_hidden_states"][:4])
    bins = TimestepBins.uniform(1000, 3)
    batch = sample_task_batch(data.images, bins, 3, seed=7, conditioning=data.conditioning)
    for x0, emb, mask in zip(batch.x0, batch.model_kwargs["encoder_hidden_states"], batch.model_kwargs["encoder_attention_mask"]):
        i = int(np.argmin(((arrays["images"][:4] - x0.numpy()) ** 2).sum(axis=(1, 2, 3))))  # which image was drawn
        np.testing.assert_array_equal(emb.numpy(), arrays["encoder_hidden_states"][i])
        np.testing.assert_array_equal(mask.numpy(), arrays["encoder_attention_mask"][i])
    shard = batch.shard(torch.tensor([4, 1]))
    torch.testing.assert_close(shard.model_kwargs["encoder_hidden_states"], batch.model_kwargs["encoder_hidden_states"][[4, 1]])


def test_class_labels_alias_and_refusals(tmp_path: Path) -> None:
    images = np.zeros((3, 1, 4, 4), np.float32)
    np.savez(tmp_path / "a.npz", images=images, class_labels=np.array([2, 0, 1]))
    data = load_dataset(tmp_path / "a.npz", image_size=None)
    assert data.labels.tolist() == [2, 0, 1] and data.conditioning == {}
    np.savez(tmp_path / "both.npz", images=images, labels=np.arange(3), class_labels=np.arange(3))
    with pytest.raises(ValueError, match="both 'labels' and 'class_labels'"):
        load_dataset(tmp_path / "both.npz", image_size=None)
    np.savez(tmp_path / "bad.npz", images=images, encoder_hidden_states=np.zeros((2, 5, 8), np.float32))
    with pytest.raises(ValueError, match=r"'encoder_hidden_states' has shape \(2, 5, 8\) but there are 3 images"):
        load_dataset(tmp_path / "bad.npz", image_size=None, limit=2)  # checked before the limit
    np.savez(tmp_path / "str.npz", images=images, prompt=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="conditioning 'prompt' has dtype"):
        load_dataset(tmp_path / "str.npz", image_size=None)


def test_model_without_conditioning_refuses_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.savez(tmp_path / "c.npz", images=np.zeros((3, 1, 16, 16), np.float32), encoder_hidden_states=np.zeros((3, 2, 4)))
    code = main(["gram", "--model", "dit-tiny", "--data", str(tmp_path / "c.npz"), "--bins", "2",
                 "--per-task", "1", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "carries the conditioning ['encoder_hidden_states'] but the model does not take it" in capsys.readouterr().err


def test_image_folder_sidecar_rows_follow_their_files(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    names = ["cat/a.png", "cat/b.png", "dog/c.png", "top.png"]
    pixels = {n: rng.integers(0, 256, (4, 4), dtype=np.uint8) for n in names}
    for n, px in pixels.items():
        (tmp_path / "imgs" / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(tmp_path / "imgs" / n)
    order = ["dog/c.png", "top.png", "cat/b.png", "cat/a.png", "other.png"]  # any order; extra rows are fine
    emb = rng.standard_normal((5, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "imgs" / "conditioning.npz", files=np.array(order), encoder_hidden_states=emb)
    data = load_dataset(tmp_path / "imgs", image_size=None)
    for image, row in zip(data.images, data.conditioning["encoder_hidden_states"]):
        n = next(n for n in names if np.allclose(image[0].numpy(), pixels[n] / 127.5 - 1, atol=1e-6))
        np.testing.assert_array_equal(row.numpy(), emb[order.index(n)])
    np.savez(tmp_path / "imgs" / "conditioning.npz", files=np.array(order[:3]), encoder_hidden_states=emb[:3])
    with pytest.raises(ValueError, match=r"lists no conditioning for 1 image\(s\), e.g. \['cat/a.png'\]"):
        load_dataset(tmp_path / "imgs", image_size=None)


# ----------------------------------------------------------------------------------------------- diffusers
try:
    import diffusers
except ImportError:  # the optional extra: gradconflict[diffusers]
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers (pip install gradconflict[diffusers])")


def _text_unet_pipeline(root: Path, sample_size: object = 8) -> Path:
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=D, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    net.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").save_pretrained(root / "scheduler")
    return root


def _loop_gram(root: Path, arrays: dict[str, np.ndarray], bins: TimestepBins, per_task: int, seed: int,
               emb: np.ndarray, space: str = "eps", weights: Path | None = None, sub: str = "unet") -> np.ndarray:
    """Independent float64 reference: diffusers' own net and alphas_cumprod, one autograd backward per task,
    ``L_k = mean_{i in k} mean (eps_hat_i - eps_i)^2`` (``space="x0"``: of ``x0_hat = (x_t - sqrt(1 - abar) eps_hat)
    / sqrt(abar)`` against x0), ``G = [<g_k, g_l>]``; the draw reproduced by the seed. A learned variance (2 C
    output channels) keeps the first C. ``sub``: the model folder (its class from its config.json)."""
    import json

    cls = getattr(diffusers, json.loads((root / sub / "config.json").read_text())["_class_name"])
    net = cls.from_pretrained(root / sub).to(F64).eval()
    if weights is not None:
        net.load_state_dict(torch.load(weights))
    abar = diffusers.DDPMScheduler.from_pretrained(root / "scheduler").alphas_cumprod.to(F64)
    images = torch.from_numpy(arrays["images"])
    batch = sample_task_batch(images, bins, per_task, seed)
    pick = [int(np.argmin(((arrays["images"] - x.numpy()) ** 2).sum(axis=(1, 2, 3)))) for x in batch.x0]
    params = [p for p in net.parameters()]
    grads = []
    for k in range(bins.K):
        sel = [i for i in range(batch.t.numel()) if int(batch.task[i]) == k]
        x0, eps, t = batch.x0[sel].to(F64), batch.noise[sel].to(F64), batch.t[sel]
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        kw = {"encoder_hidden_states": torch.from_numpy(emb[[pick[i] for i in sel]]).to(F64)}
        if "encoder_attention_mask" in arrays:
            kw["encoder_attention_mask"] = torch.from_numpy(arrays["encoder_attention_mask"][[pick[i] for i in sel]]).to(F64)
        if sub == "transformer":
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        out = net(x_t, timestep=t, **kw).sample[:, : x0.shape[1]]
        err = out - eps if space == "eps" else (x_t - (1 - a).sqrt() * out) / a.sqrt() - x0
        loss = err.pow(2).flatten(1).mean(1).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads)
    return (g @ g.T).numpy()


@needs_diffusers
@pytest.mark.parametrize("hw", [(8, 8), (8, 12)])  # (8, 12): non-square latents, as stored (issue #18 point 2)
def test_gram_on_text_unet_equals_float64_loop(tmp_path: Path, hw: tuple[int, int]) -> None:
    root = _text_unet_pipeline(tmp_path / "pipe", hw[0] if hw[0] == hw[1] else list(hw))
    arrays = _cond_npz(tmp_path / "cond.npz", hw=hw)
    out = tmp_path / "out"
    code = main(["gram", "--model", f"diffusers:{root}", "--data", str(tmp_path / "cond.npz"), "--bins", "3",
                 "--per-task", "2", "--loss-space", "eps", "--seed", "3", "--out", str(out)])
    assert code == 0
    got = pd.read_csv(out / "gram.csv", index_col=0).to_numpy()
    want = _loop_gram(root, arrays, TimestepBins.uniform(1000, 3), 2, 3, arrays["encoder_hidden_states"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    if hw != (8, 8):
        return
    # the mask matters: without it the Gram differs (the masked tokens are attended to)
    unmasked = _loop_gram(root, {k: v for k, v in arrays.items() if k != "encoder_attention_mask"},
                          TimestepBins.uniform(1000, 3), 2, 3, arrays["encoder_hidden_states"])
    assert np.abs(unmasked - want).max() > 1e-3 * np.abs(want).max()


@needs_diffusers
def test_null_conditioning_and_missing_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _text_unet_pipeline(tmp_path / "pipe")
    arrays = _cond_npz(tmp_path / "cond.npz")
    np.savez(tmp_path / "plain.npz", images=arrays["images"])
    common = ["gram", "--model", f"diffusers:{root}", "--data", str(tmp_path / "plain.npz"), "--bins", "2",
              "--per-task", "1", "--loss-space", "eps", "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "o")]) == 2
    assert "--null-conditioning" in capsys.readouterr().err
    assert main([*common, "--null-conditioning", "--null-length", "3", "--out", str(tmp_path / "zero")]) == 0
    got = pd.read_csv(tmp_path / "zero" / "gram.csv", index_col=0).to_numpy()
    plain = {"images": arrays["images"]}
    want = _loop_gram(root, plain, TimestepBins.uniform(1000, 2), 1, 1, np.zeros((N, 3, D)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    given = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
    np.save(tmp_path / "empty_prompt.npy", given)
    assert main([*common, "--null-conditioning", str(tmp_path / "empty_prompt.npy"), "--out", str(tmp_path / "g")]) == 0
    got = pd.read_csv(tmp_path / "g" / "gram.csv", index_col=0).to_numpy()
    want = _loop_gram(root, plain, TimestepBins.uniform(1000, 2), 1, 1, np.broadcast_to(given, (N, 4, D)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@needs_diffusers
def test_track_passes_the_conditioning(tmp_path: Path) -> None:
    """``gradconflict track`` on two checkpoints of the text UNet: each step's Gram (x0 loss, seed of step s and
    resample r: ``(seed * 1000003 + s) * 101 + r``) equals the float64 loop on those weights and embeddings."""
    root = _text_unet_pipeline(tmp_path / "pipe")
    arrays = _cond_npz(tmp_path / "cond.npz")
    net = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    torch.save(net.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.1)
    torch.save(net.state_dict(), tmp_path / "b.pt")
    out = tmp_path / "track"
    assert main(["track", "--model", f"diffusers:{root}", "--checkpoints", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"),
                 "--steps", "0", "1", "--data", str(tmp_path / "cond.npz"), "--bins", "2", "--per-task", "2",
                 "--resamples", "1", "--ugd-steps", "2", "--out", str(out)]) == 0
    grams = np.load(out / "track_grams.npz")
    for step, weights in ((0, tmp_path / "a.pt"), (1, tmp_path / "b.pt")):
        want = _loop_gram(root, arrays, TimestepBins.uniform(1000, 2), 2, (0 * 1_000_003 + step) * 101,
                          arrays["encoder_hidden_states"], space="x0", weights=weights)
        np.testing.assert_allclose(grams[f"step{step}_r0"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@needs_diffusers
def test_gram_under_torchrun_shards_the_conditioning(tmp_path: Path) -> None:
    """Two gloo ranks each take their share of the samples with their own embeddings and masks: the Gram over the
    union equals the float64 loop."""
    import os
    import subprocess
    import sys

    root = _text_unet_pipeline(tmp_path / "pipe")
    arrays = _cond_npz(tmp_path / "cond.npz")
    env = {**os.environ, "GRADCONFLICT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gradconflict",
           "gram", "--model", f"diffusers:{root}", "--data", str(tmp_path / "cond.npz"), "--bins", "3", "--per-task",
           "2", "--loss-space", "eps", "--seed", "3", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_csv(tmp_path / "out" / "gram.csv", index_col=0).to_numpy()
    want = _loop_gram(root, arrays, TimestepBins.uniform(1000, 3), 2, 3, arrays["encoder_hidden_states"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@needs_diffusers
@pytest.mark.parametrize("cls", ["Transformer2DModel", "PixArtTransformer2DModel"])
def test_gram_on_pixart_style_transformer_equals_float64_loop(tmp_path: Path, cls: str) -> None:
    """A text-conditioned transformer (ada_norm_single, caption projection 6 -> 8, learned sigma) from
    ``transformer/``: the embeddings' width D is the caption width; masks included."""
    torch.manual_seed(0)
    net = getattr(diffusers, cls)(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=8, caption_channels=6,
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False)
    root = tmp_path / "pipe"
    net.save_pretrained(root / "transformer")
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").save_pretrained(root / "scheduler")
    arrays = _cond_npz(tmp_path / "cond.npz")
    arrays["encoder_hidden_states"] = np.random.default_rng(5).standard_normal((N, L, 6)).astype(np.float32)
    np.savez(tmp_path / "cond.npz", **arrays)
    assert main(["gram", "--model", f"diffusers:{root}", "--data", str(tmp_path / "cond.npz"), "--bins", "2",
                 "--per-task", "2", "--loss-space", "eps", "--seed", "4", "--out", str(tmp_path / "out")]) == 0
    got = pd.read_csv(tmp_path / "out" / "gram.csv", index_col=0).to_numpy()
    want = _loop_gram(root, arrays, TimestepBins.uniform(1000, 2), 2, 4, arrays["encoder_hidden_states"],
                      sub="transformer")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@needs_diffusers
def test_added_cond_kwargs_are_nested_and_names_checked_against_the_model() -> None:
    from gradconflict.adapters import DiffusersModel
    from gradconflict.adapters.conditioning import check_accepted, nest

    a, b = torch.zeros(2, 3), torch.ones(2, 6)
    assert nest({"added_cond_kwargs.text_embeds": a, "added_cond_kwargs.time_ids": b, "encoder_hidden_states": a}) == {
        "added_cond_kwargs": {"text_embeds": a, "time_ids": b}, "encoder_hidden_states": a}
    torch.manual_seed(0)
    text = DiffusersModel(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        cross_attention_dim=D, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    assert text.config.cross_attention_dim == D
    check_accepted(text, ["encoder_hidden_states", "encoder_attention_mask", "added_cond_kwargs.text_embeds"], "d")
    plain = DiffusersModel(diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                                 block_out_channels=(8, 16), norm_num_groups=4,
                                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                                 up_block_types=("UpBlock2D", "UpBlock2D")))
    assert plain.config.cross_attention_dim is None
    with pytest.raises(ValueError, match=r"carries the conditioning \['encoder_hidden_states'\] but the model does not"):
        check_accepted(plain, ["encoder_hidden_states"], "d")


@needs_diffusers
def test_transfer_passes_the_conditioning(tmp_path: Path) -> None:
    """``gradconflict transfer --mode lookahead`` (one SGD step per bin) on the text UNet: the losses before and after
    equal a float64 reference: the documented draws (evaluation set by ``sample_task_batch``, each copy's batch:
    image indices, t ~ U{low..high-1}, float64 noise from its seeded generator) with each image's embeddings."""
    from gradconflict.transfer.matrix import _EVAL, _FT
    from gradconflict.transfer.stacked import derive_seed, sources_of

    root = _text_unet_pipeline(tmp_path / "pipe")
    arrays = _cond_npz(tmp_path / "cond.npz")
    lr, out = 0.05, tmp_path / "out"
    assert main(["transfer", "--model", f"diffusers:{root}", "--data", str(tmp_path / "cond.npz"), "--bins", "2",
                 "--mode", "lookahead", "--lr", str(lr), "--batch-size", "2", "--eval-samples", "2", "--no-all",
                 "--quiet", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "transfer.csv")
    net = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").to(F64).eval()
    abar = diffusers.DDPMScheduler.from_pretrained(root / "scheduler").alphas_cumprod.to(F64)
    images = torch.from_numpy(arrays["images"]).to(F64)
    emb, mask = (torch.from_numpy(arrays[k]).to(F64) for k in ("encoder_hidden_states", "encoder_attention_mask"))

    def losses(params, idx, t, eps):  # per-sample x0-space loss of an eps model
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images[idx] + (1 - a).sqrt() * eps
        out = torch.func.functional_call(net, params, (x_t, t), {"encoder_hidden_states": emb[idx],
                                                                 "encoder_attention_mask": mask[idx]}).sample
        return ((x_t - (1 - a).sqrt() * out) / a.sqrt() - images[idx]).pow(2).flatten(1).mean(1)

    bins = TimestepBins.uniform(1000, 2)
    ev = sample_task_batch(images.float(), bins, 2, derive_seed(0, _EVAL))
    ev_idx = torch.tensor([int(np.argmin(((arrays["images"] - x.numpy()) ** 2).sum(axis=(1, 2, 3)))) for x in ev.x0])
    theta0 = {k: v.detach() for k, v in net.named_parameters()}

    def per_bin(params):
        l = losses(params, ev_idx, ev.t, ev.noise.to(F64))
        return torch.stack([l[ev.task == j].mean() for j in range(2)])

    before = per_bin(theta0)
    for source in sources_of(bins, include_all=False):
        g = torch.Generator().manual_seed(derive_seed(0, _FT, source.index + 1))
        idx = torch.randint(0, N, (2,), generator=g)
        t = torch.randint(source.low, source.high, (2,), generator=g)
        eps = torch.randn((2, 4, 8, 8), generator=g, dtype=F64)
        params = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        grads = torch.autograd.grad(losses(params, idx, t, eps).mean(), list(params.values()))
        after = per_bin({k: v.detach() - lr * gk for (k, v), gk in zip(params.items(), grads)})
        rows = frame[frame["source"] == source.index].sort_values("target")
        np.testing.assert_allclose(rows["loss_before"], before.detach().numpy(), rtol=1e-5)
        np.testing.assert_allclose(rows["loss_after"], after.detach().numpy(), rtol=1e-5)


def test_train_refuses_conditioning_its_models_cannot_take(tmp_path: Path) -> None:
    from gradconflict.train import TrainConfig, train

    np.savez(tmp_path / "c.npz", images=np.zeros((4, 1, 8, 8), np.float32), encoder_hidden_states=np.zeros((4, 2, 3)))
    config = TrainConfig(data=str(tmp_path / "c.npz"), image_size=8, steps=1, batch_size=2)
    with pytest.raises(ValueError, match=r"carries the per-sample conditioning \['encoder_hidden_states'\]"):
        train(config, tmp_path / "run", progress=False)


@needs_diffusers
def test_bins_passes_the_conditioning(tmp_path: Path) -> None:
    """``gradconflict bins`` on the text UNet: the fine cosine of one batch equals the float64 loop's."""
    root = _text_unet_pipeline(tmp_path / "pipe")
    arrays = _cond_npz(tmp_path / "cond.npz")
    assert main(["bins", "--model", f"diffusers:{root}", "--data", str(tmp_path / "cond.npz"), "--fine", "3", "--bins", "2",
                 "--batches", "1", "--per-task", "2", "--seed", "3", "--loss-space", "eps", "--out", str(tmp_path / "o")]) == 0
    got = pd.read_csv(tmp_path / "o" / "fine_cosine.csv", index_col=0).to_numpy()
    G = _loop_gram(root, arrays, TimestepBins.uniform(1000, 3), 2, 3, arrays["encoder_hidden_states"])
    d = np.sqrt(np.diag(G))
    np.testing.assert_allclose(got, G / np.outer(d, d), rtol=0, atol=1e-5)

"""User-facing CLI behaviour: a training checkpoint brings its run's config, the input size comes from the
model's config, mismatches and missing files are one-line errors with exit code 2, and `solve` reads the
usual CSV layouts."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradconflict.cli import main
from gradconflict.cli.solve import read_gram
from gradconflict.models import build_model
from gradconflict.schedule import NoiseSchedule
from gradconflict.spec import load_model
from gradconflict.train import TrainConfig, train

# one step of a very small DiT with v prediction on the cosine schedule (stored config differs from dit-tiny's)
RUN = dict(data="synthetic", data_limit=16, model="dit-tiny", model_overrides={"hidden_size": 32, "depth": 1},
           image_size=8, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=1, bins=2, steps=1,
           prediction="v", schedule="cosine", bf16=False, cpu_threads=1)
GRAM = ["--data", "synthetic", "--bins", "2", "--per-task", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run_v")
    train(TrainConfig(**RUN), out, progress=False)
    return out


def _model_file(tmp_path: Path, config: str) -> Path:
    """A file:function spec whose model records the input shape it sees; ``config`` is Python for ``self.config``."""
    path = tmp_path / "shaped.py"
    path.write_text(textwrap.dedent(f"""
        import types
        import torch, torch.nn as nn

        SEEN = []

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.config = {config}
                self.c = nn.Conv2d(1, 1, 3, padding=1)
                self.t = nn.Embedding(1000, 1)

            def forward(self, x, t):
                SEEN.append(tuple(x.shape))
                return self.c(x) + self.t(t)[:, :, None, None]

        def build():
            return Net()
    """))
    return path


def _seen(path: Path) -> set[tuple[int, ...]]:
    """(C, H, W) of every input the model of the file ``path`` was called with."""
    module = next(m for name, m in sys.modules.items() if name.startswith("gradconflict_user_")
                  and getattr(m, "__file__", None) == str(path))
    return {shape[1:] for shape in module.SEEN}


# finding 2: a training checkpoint given with a built-in name uses its run's config


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.safetensors"])
def test_training_checkpoint_brings_prediction_schedule_and_model_config(run_dir: Path, name: str, capsys) -> None:
    loaded = load_model("dit-tiny", run_dir / name, weights="raw")  # the default, EMA: tests/test_spec_errors.py
    assert loaded.prediction == "v"
    np.testing.assert_allclose(loaded.schedule.alphas_cumprod, NoiseSchedule.cosine().alphas_cumprod)
    assert (loaded.model.config.image_size, loaded.model.config.hidden_size, loaded.model.config.depth) == (8, 32, 1)
    raw = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]  # the raw (not EMA) weights
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in raw.items())
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "prediction 'v'" in note and "cosine" in note and "hidden_size=32" in note


def test_gram_and_track_with_training_checkpoint(run_dir: Path, tmp_path: Path, capsys) -> None:
    ck = str(run_dir / "checkpoint.pt")
    assert main(["gram", "--model", "dit-tiny", "--checkpoint", ck, *GRAM, "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "prediction 'v'" in err and "untrained" not in err
    assert main(["track", "--model", "dit-tiny", "--checkpoints", ck, ck, *GRAM, "--resamples", "1",
                 "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().err.count("prediction 'v'") == 1  # noted once, not per checkpoint


def test_plain_state_dict_keeps_the_builtin_defaults(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    model = build_model("dit-tiny")
    for p in model.parameters():
        p.data.fill_(0.25)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model("dit-tiny", tmp_path / "w.safetensors")
    assert loaded.prediction == "eps"
    np.testing.assert_allclose(loaded.schedule.alphas_cumprod, NoiseSchedule.linear().alphas_cumprod)
    assert all(bool((p == 0.25).all()) for p in loaded.model.parameters())
    assert capsys.readouterr().err == ""


def test_training_checkpoint_of_another_architecture_is_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="--model dit-tiny"):
        load_model("unet-tiny", run_dir / "checkpoint.pt")


# finding 3: the input size comes from config.image_size or diffusers' config.sample_size


@pytest.mark.parametrize("config", ['{"sample_size": 8, "in_channels": 1}',
                                    'types.SimpleNamespace(image_size=None, sample_size=(8, 8), in_channels=1)'])
def test_gram_feeds_the_size_in_the_model_config(tmp_path: Path, config: str) -> None:
    path = _model_file(tmp_path, config)
    assert main(["gram", "--model", f"{path}:build", *GRAM, "--out", str(tmp_path / "o")]) == 0
    assert _seen(path) == {(1, 8, 8)}


def test_gram_feeds_a_diffusers_unet_its_sample_size(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    path = tmp_path / "unet.py"
    path.write_text(textwrap.dedent("""
        import torch
        from diffusers import UNet2DModel

        SEEN = []

        def build():
            torch.manual_seed(0)
            unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                               layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
            unet.register_forward_pre_hook(lambda module, args: SEEN.append(tuple(args[0].shape)))
            return unet
    """))
    assert main(["gram", "--model", f"{path}:build", *GRAM, "--out", str(tmp_path / "o")]) == 0
    assert _seen(path) == {(1, 8, 8)}


def test_gram_without_known_size_asks_for_image_size(tmp_path: Path, capsys) -> None:
    path = _model_file(tmp_path, "None")
    assert main(["gram", "--model", f"{path}:build", *GRAM, "--out", str(tmp_path / "o")]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["gram", "--model", f"{path}:build", *GRAM, "--image-size", "4", "--out", str(tmp_path / "o")]) == 0
    assert _seen(path) == {(1, 4, 4)}


def test_gram_without_known_size_reads_the_users_files_at_their_own_size(tmp_path: Path, capsys) -> None:
    path = _model_file(tmp_path, "None")
    data = tmp_path / "imgs.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (8, 1, 6, 6)).astype(np.float32))
    assert main(["gram", "--model", f"{path}:build", "--data", str(data), "--bins", "2", "--per-task", "1",
                 "--out", str(tmp_path / "o")]) == 0
    assert "using the data's 6 x 6" in capsys.readouterr().err
    assert _seen(path) == {(1, 6, 6)}
    np.save(data, np.zeros((8, 1, 6, 10), dtype=np.float32))  # not square: read as stored too (issue #18)
    assert main(["gram", "--model", f"{path}:build", "--data", str(data), "--bins", "2", "--per-task", "1",
                 "--out", str(tmp_path / "o2")]) == 0
    assert "using the data's 6 x 10" in capsys.readouterr().err
    assert _seen(path) == {(1, 6, 10)}


# finding 6: --image-size that differs from the model's


def test_gram_image_size_mismatch_names_both_sizes(tmp_path: Path, capsys) -> None:
    assert main(["gram", "--model", "dit-tiny", *GRAM, "--image-size", "8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "16 x 16" in err and "--image-size is 8" in err and "Traceback" not in err


# finding 7: missing files, CUDA on a CPU build, mismatching checkpoints


@pytest.mark.parametrize("flags", [
    ["--model", "dit-tiny", "--data", "{tmp}/none.npy"],
    ["--model", "dit-tiny", "--checkpoint", "{tmp}/none.pt"],
    ["--model", "{tmp}/none.py:build"],
    ["--model", "diffusers:{tmp}/none"],
])
def test_missing_paths_are_one_line_errors(tmp_path: Path, flags: list[str], capsys) -> None:
    flags = [f.format(tmp=tmp_path) for f in flags]
    argv = ["gram", *GRAM, *flags, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "none" in err[0]


def test_cuda_without_cuda_is_an_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gram", "--model", "dit-tiny", *GRAM, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_checkpoint_with_other_shapes_names_the_keys(tmp_path: Path, capsys) -> None:
    torch.save(build_model("dit-tiny", hidden_size=32).state_dict(), tmp_path / "small.pt")
    argv = ["gram", "--model", "dit-tiny", "--checkpoint", str(tmp_path / "small.pt"), *GRAM, "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "small.pt" in err and "patch_embed.weight (32, 1, 2, 2) vs (64, 1, 2, 2)" in err


def test_unexpected_exceptions_are_not_swallowed(tmp_path: Path, monkeypatch) -> None:
    # a bug in gradconflict itself propagates (an error in a user's spec file is reported in one line instead:
    # tests/test_spec_errors.py)
    import gradconflict.conflict

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in gradconflict")

    monkeypatch.setattr(gradconflict.conflict, "summary", broken)
    with pytest.raises(RuntimeError, match="a bug in gradconflict"):
        main(["gram", "--model", "dit-tiny", *GRAM, "--out", str(tmp_path / "o")])


# finding 10: the untrained built-in model is named as such


def test_gram_of_untrained_builtin_says_so(tmp_path: Path, capsys) -> None:
    assert main(["gram", "--model", "dit-tiny", *GRAM, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "untrained dit-tiny" in err and "--checkpoint" in err


# finding 8: solve reads header-only CSVs and rejects negative --tol / --digits

G = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]])


@pytest.mark.parametrize("layout", ["plain", "index", "noindex", "savetxt_header", "gram_style"])
def test_read_gram_layouts(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "g.csv"
    labels = ["a", "b", "c"]
    if layout == "plain":
        np.savetxt(path, G, delimiter=",")
    elif layout == "index":
        pd.DataFrame(G).to_csv(path)
    elif layout == "noindex":
        pd.DataFrame(G).to_csv(path, index=False)
    elif layout == "savetxt_header":
        np.savetxt(path, G, delimiter=",", header="a,b,c", comments="")
    else:
        pd.DataFrame(G, index=pd.Index(labels, name="bin"), columns=labels).to_csv(path)
    frame = read_gram(str(path))
    np.testing.assert_array_equal(frame.to_numpy(), G)
    if layout in ("savetxt_header", "gram_style"):
        assert list(frame.index) == labels


@pytest.mark.parametrize("layout", ["plain", "gram_style", "to_csv_empty"])
def test_a_nan_in_the_gram_is_refused_by_position_not_read_as_a_label(tmp_path: Path, layout: str, capsys) -> None:
    """np.savetxt writes NaN as "nan": a first row holding one must not turn into a header (it gave K = 1, exit 0);
    DataFrame.to_csv writes it as an empty cell."""
    path = tmp_path / "g.csv"
    bad = G.copy()
    bad[0, 2] = bad[2, 0] = np.nan
    if layout == "plain":
        np.savetxt(path, bad, delimiter=",")
    else:
        frame = pd.DataFrame(bad, index=list("abc"), columns=list("abc"))
        frame.to_csv(path, na_rep="nan" if layout == "gram_style" else "")
    assert main(["solve", str(path), "--lam", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if layout == "to_csv_empty":
        assert "the 3 x 3 matrix has non-numeric or empty entries" in err
    else:
        assert read_gram(str(path)).shape == (3, 3)
        assert "non-finite values (NaN at [0, 2]" in err


def test_read_gram_non_square_says_what_was_parsed(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    pd.DataFrame(G[:2], columns=["a", "b", "c"]).to_csv(path, index=False)  # header + 2 rows x 3 columns
    with pytest.raises(ValueError, match=r"3 row\(s\) x 3 .*accepted layouts"):
        read_gram(str(path))


@pytest.mark.parametrize("flag", ["--tol", "--digits"])
def test_solve_rejects_negative_values(tmp_path: Path, flag: str, capsys) -> None:
    path = tmp_path / "g.csv"
    np.savetxt(path, G, delimiter=",")
    assert main(["solve", str(path), flag, "-1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and f"{flag} must be >= 0" in out.err


def test_user_model_specs_resolve_like_python_does_and_say_what_they_assume(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    """``module:function`` finds a module in the current folder (as ``python -m`` does) and a model file's own
    imports resolve beside it; a bare model is told it gets the linear schedule and eps; wrong returns are named."""
    import sys

    from gradconflict.spec import spec_identity

    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "helper_net_mod.py").write_text("import torch\n\ndef net():\n    return torch.nn.Conv2d(1, 1, 3, padding=1)\n")
    (pkg / "bare_spec_mod.py").write_text(
        "from helper_net_mod import net\n\n"  # an import beside the file
        "def build():\n    return net()\n\n"
        "def pair():\n    return net(), 'eps'\n\n"
        "def func():\n    return lambda x, t: x, None, 'eps'\n")
    monkeypatch.chdir(pkg)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the folders the loader adds
    loaded = load_model("bare_spec_mod:build")
    assert isinstance(loaded.model, torch.nn.Conv2d) and loaded.prediction == "eps"
    assert "linear schedule (T = 1000) and eps prediction are assumed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="got a tuple of 2 items"):
        load_model(f"{pkg / 'bare_spec_mod.py'}:pair")
    with pytest.raises(ValueError, match="returned a function as its model"):
        load_model(f"{pkg / 'bare_spec_mod.py'}:func")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:build")
    assert spec_identity("bare_spec_mod.py:build") == f"{pkg / 'bare_spec_mod.py'}:build"
    assert spec_identity("dit-tiny") == "dit-tiny"


def test_model_outputs_and_out_paths_that_are_user_mistakes_are_one_line_errors(tmp_path: Path, capsys) -> None:
    """A dict output, a tuple with no tensor first, data with the wrong channels, and an --out that is a file: each
    a ValueError naming the problem (the CLI's one-line error path), not a traceback from deep inside torch."""
    import gradconflict as gc

    class Net(torch.nn.Module):
        def __init__(self, wrap=None):
            super().__init__()
            self.conv, self.wrap = torch.nn.Conv2d(1, 1, 3, padding=1), wrap

        def forward(self, x, t):
            y = self.conv(x)
            return {"pred": y} if self.wrap == "dict" else (None, y) if self.wrap == "tuple" else y

    schedule = gc.NoiseSchedule.linear()
    t = torch.tensor([10, 900])
    task = torch.tensor([0, 1])
    x0 = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"returned a dict with keys \['pred'\]"):
        gc.task_gram(Net("dict"), x0, t, task, schedule=schedule)
    with pytest.raises(ValueError, match="returned a tuple whose first item is a NoneType"):
        gc.task_gram(Net("tuple"), x0, t, task, schedule=schedule)
    with pytest.raises(ValueError, match="x_t with 3 channels"):
        gc.task_gram(Net(), torch.zeros(2, 3, 8, 8), t, task, schedule=schedule)
    (tmp_path / "afile").write_text("x")
    code = main(["gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "2", "--per-task", "1",
                 "--out", str(tmp_path / "afile")])
    assert code == 2 and "is not a folder; pass a folder" in capsys.readouterr().err
    code = main(["gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "2", "--per-task", "1",
                 "--out", str(tmp_path / "afile" / "sub")])  # a file on the way: was a NotADirectoryError traceback
    assert code == 2 and f"({tmp_path / 'afile'} is a file); pass a folder" in capsys.readouterr().err


def test_task_gram_names_the_loss_space_and_refuses_bins_of_another_T() -> None:
    import gradconflict as gc

    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    schedule = gc.NoiseSchedule.linear()
    x0 = torch.zeros(2, 1, 8, 8)
    t = torch.tensor([10, 400])
    model = torch.nn.Module()  # never called: the arguments are refused first
    model.conv = net
    with pytest.raises(ValueError, match="unknown loss_space 'eps2'"):
        gc.task_gram(model, x0, t, torch.tensor([0, 1]), schedule=schedule, loss_space="eps2")
    with pytest.raises(ValueError, match="the bins cover T = 500 timesteps but the schedule has T = 1000"):
        gc.task_gram(model, x0, t, gc.TimestepBins.uniform(500, 2), schedule=schedule)



def test_a_layer_with_the_wrong_channels_is_not_blamed_on_the_data_and_missing_dependencies_are_named(
        tmp_path: Path, monkeypatch) -> None:
    import sys

    import gradconflict as gc

    class Buggy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Conv2d(8, 1, 3, padding=1)  # 6 != 8

        def forward(self, x, t):
            return self.b(self.a(x))

    with pytest.raises(RuntimeError, match="expected input"):  # torch's own error: the model is wrong, not the data
        gc.task_gram(Buggy(), torch.zeros(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 1]),
                     schedule=gc.NoiseSchedule.linear())
    (tmp_path / "needs_dep_mod.py").write_text("import not_installed_dep_xyz\n\ndef build():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError, match="importing 'needs_dep_mod' failed: No module named 'not_installed_dep_xyz'"):
        load_model("needs_dep_mod:build")


@pytest.mark.parametrize("kind", ["lightning", "not_a_checkpoint", "ema_beside", "ddp_prefix", "compile_prefix", "nan"])
def test_checkpoints_users_bring(tmp_path: Path, kind: str, capsys) -> None:
    """Checkpoints as other trainers write them: each loads with a note saying what was done, or is refused
    with the cause and the fix (not torch's weights_only advice, which the CLI cannot follow)."""
    import argparse

    import torch

    from gradconflict.models import build_model

    state = build_model("dit-tiny").state_dict()
    path = tmp_path / "ck.pt"
    if kind == "lightning":
        torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1e-4)}, path)
    elif kind == "not_a_checkpoint":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    elif kind == "ema_beside":
        torch.save({"model": state, "ema": {k: v.clone() for k, v in state.items()}}, path)
    elif kind in ("ddp_prefix", "compile_prefix"):
        prefix = "module." if kind == "ddp_prefix" else "_orig_mod."
        torch.save({prefix + k: v for k, v in state.items()}, path)
    else:
        broken = {k: v.clone() for k, v in state.items()}
        broken["final.weight" if "final.weight" in broken else next(iter(broken))].view(-1)[0] = float("inf")
        torch.save(broken, path)
    code = main(["gram", "--model", "dit-tiny", "--checkpoint", str(path), *GRAM, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err
    expected = {
        "lightning": (2, "holds pickled Python objects besides tensors (argparse.Namespace)"),
        "not_a_checkpoint": (2, "is not a torch (.pt) or .safetensors file"),
        "ema_beside": (0, "using its 'model' weights; it also holds ['ema']"),
        "ddp_prefix": (0, "removed the key prefix module."),
        "compile_prefix": (0, "removed the key prefix _orig_mod."),
        "nan": (2, "holds NaN or Inf in 1 tensor(s)"),
    }[kind]
    assert code == expected[0] and expected[1] in err, err


def test_minus_inf_in_a_buffer_is_not_broken_weights(tmp_path: Path, capsys) -> None:
    """An additive attention mask (-inf above the diagonal, as nn.Transformer.generate_square_subsequent_mask
    makes) is a buffer, not a weight: the checkpoint loads."""
    import torch

    (tmp_path / "masked.py").write_text(
        "import torch, torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(64, 64)\n"
        "        self.register_buffer('mask', torch.full((4, 4), float('-inf')).triu(1))\n"
        "    def forward(self, x, t):\n"
        "        return self.lin(x.reshape(x.shape[0], -1)).reshape(x.shape)\n"
        "def build():\n"
        "    return Net()\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("masked", tmp_path / "masked.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), tmp_path / "ck.pt")
    code = main(["gram", "--model", f"{tmp_path / 'masked.py'}:build", "--checkpoint", str(tmp_path / "ck.pt"),
                 "--image-size", "8", *GRAM, "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err


_OWN_MLP = """
import types
import torch, torch.nn as nn


class MLP(nn.Module):
    def __init__(self, size=8, num_classes=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(size * size + 1, 16), nn.SiLU(), nn.Linear(16, size * size))
        self.emb = nn.Embedding(3, 1)
        nn.init.zeros_(self.emb.weight)  # the same outputs with or without labels: only the gradients differ
        if num_classes:
            self.config = types.SimpleNamespace(num_classes=num_classes)

    def forward(self, x, t, y=None):
        n = x.shape[0]
        h = torch.cat([x.reshape(n, -1), t.float()[:, None] / 1000], 1)
        if y is not None:
            h = h + self.emb(y)
        return self.net(h).reshape(x.shape)


def build():
    return MLP()


def build_conditional():
    return MLP(num_classes=3)
"""


def test_own_model_without_declared_size_or_classes_is_told_what_to_set(tmp_path: Path, capsys) -> None:
    """A model that does not declare its input size fails on the data's 16 x 16: one line naming the size used and
    --image-size (was a traceback); a forward taking y without num_classes in its config gets a note that the
    labels are not passed, and with num_classes they are."""
    (tmp_path / "mymlp.py").write_text(_OWN_MLP)
    data = tmp_path / "labelled.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.random((12, 1, 16, 16)).astype(np.float32), labels=np.arange(12) % 3)
    spec = str(tmp_path / "mymlp.py")
    common = ["--data", str(data), "--bins", "2", "--per-task", "2"]
    assert main(["gram", "--model", f"{spec}:build", *common, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "the model's forward failed on 16 x 16 images (the data's own size" in err and "--image-size N" in err
    assert "does not set num_classes, so the data's class labels are not passed" in err
    assert main(["gram", "--model", f"{spec}:build", *common, "--image-size", "8", "--out", str(tmp_path / "b")]) == 0
    assert "not passed" in capsys.readouterr().err
    assert main(["gram", "--model", f"{spec}:build_conditional", *common, "--image-size", "8",
                 "--out", str(tmp_path / "c")]) == 0
    assert "not passed" not in capsys.readouterr().err
    assert main(["gram", "--model", "dit-tiny", *common, "--out", str(tmp_path / "d")]) == 0  # num_classes = 0
    assert "not passed" not in capsys.readouterr().err  # unconditional on purpose: no note
    a = pd.read_csv(tmp_path / "b" / "gram.csv", index_col=0).to_numpy()
    c = pd.read_csv(tmp_path / "c" / "gram.csv", index_col=0).to_numpy()
    # the same weights and outputs; only the conditional model's label embedding adds gradient (and Gram) mass
    assert (np.diag(c) > np.diag(a) * (1 + 1e-6)).all()


def test_forward_hint_leaves_out_of_memory_alone() -> None:
    import torch

    from gradconflict.spec import forward_hint

    model = torch.nn.Linear(2, 2)  # no config: the size hint would apply to a size error
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with forward_hint(model, 8, None):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(ValueError, match="pass --image-size N"):
        with forward_hint(model, 8, None):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x65 and 257x64)")

"""``figures/REPORT.md``: one verdict per claim, the numbers behind it, and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .._io import write_text

__all__ = ["write_report", "write_replicated_report", "VERDICT_HOLDS", "VERDICT_FAILS"]

VERDICT_HOLDS = "**holds**"
VERDICT_FAILS = "**does not hold**"


def _claims_link(path: Path) -> str:
    """The relative link from the report at ``path`` to the repository's ``docs/claims.md``: the report lies in a
    ``figures/`` folder beside ``docs/`` (``figures/REPORT.md``) or below it (``figures/quick/``, ``figures/clustered/``)."""
    parts = Path(path).resolve().parent.parts
    below = parts[max(i for i, part in enumerate(parts) if part == "figures"):] if "figures" in parts else parts[-1:]
    return "../" * len(below) + "docs/claims.md"


def write_report(path: Path, config: Any, claims: pd.DataFrame, track: Any, transfer: Any,
                 sensitivity: Optional[pd.DataFrame] = None) -> Path:
    """Write the report; ``sensitivity`` (:func:`.claims.c3_lambda_sensitivity`) adds C3 at other lam."""
    tc = config.train
    lines = [
        "# Reproduction report: gradient conflicts between diffusion timesteps",
        "",
        f"Preset `{config.name}`: {tc.model} trained on {tc.data} ({tc.image_size}x{tc.image_size}) for {tc.steps} "
        f"steps, {tc.prediction}-prediction, {tc.weighting} weighting, {tc.schedule} schedule (T = {tc.T}), "
        f"seed {tc.seed}, device {tc.device}. Tracking every {config.every} steps: K = {config.track.bins} bins, "
        f"{config.track.per_task} samples per bin, {config.track.resamples} independent batches per checkpoint, "
        f"regularizer lam = {config.track.lam} x trace(G)/K, task losses in {config.track.loss_space} units. "
        f"Transfer: {config.transfer}.",
        "",
        f"Claims of Hang et al. (ICCV 2023), as described in [docs/claims.md]({_claims_link(path)}). The numbers are in `claims.csv`; they are "
        "computed from the run's tidy tables (`runs/.../track/track_objectives.csv`, `track_weights.csv`, "
        "`track_grams.npz`, `transfer/transfer.csv`), which the CSVs here summarize; +- values are standard "
        "errors. A claim that does not hold on this setup is reported as measured. The claims are measured on "
        f"this model after {tc.steps} training steps: `samples.png` shows how far it got (a short run does not "
        "yet draw clean images).",
        "",
        "| claim | statement | verdict | significant (> 2 s.e.) | measured |",
        "|---|---|---|---|---|",
    ]
    for _, c in claims.iterrows():
        verdict = VERDICT_HOLDS if c["holds"] else VERDICT_FAILS
        cells = [str(c["claim"]), str(c["statement"]), verdict, "yes" if c["significant"] else "no", str(c["measured"])]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if sensitivity is not None and len(sensitivity):
        lines += ["", "## C3 at other regularizers", "",
                  "The regularizer decides how much the optimum spreads weight; the paper gives no lam. Mean ratio to "
                  "the optimum of each strategy, same Grams (`c3_lambda_sensitivity.csv`):", "",
                  "| lam (x trace(G)/K) | " + " | ".join(sensitivity["strategy"].unique()) + " | lowest |",
                  "|---" * (sensitivity["strategy"].nunique() + 2) + "|"]
        for lam, block in sensitivity.groupby("lam", sort=True):
            best = block.loc[block["mean_ratio"].idxmin(), "strategy"]
            cells = [f"{r:.3g}" for r in block["mean_ratio"]]
            lines.append(f"| {lam:g} | " + " | ".join(cells) + f" | {best} |")
    lines += [
        "",
        "## Figures",
        "",
        "- `fig2_transfer.png` / `.csv`: cross-bin fine-tuning transfer (C1).",
        "- `fig3_ugd_weights.png` / `.csv`: UGD weights per bin over training with the resampling band (C2).",
        "- `fig4_pareto_objective.png` / `.csv`: strategies' Pareto objective and ratio to the optimum (C3).",
        "- `lambda_sweep.png` / `.csv`: optimal weights from lam = 0 to large lam.",
        "- `conflict_vs_distance.png` / `.csv`: cosine of task gradients against log-SNR distance.",
        "- `cosine_final.png` / `.csv`: cosine matrix at the last checkpoint; `samples.png`: DDIM samples of the model.",
        "",
    ]
    return write_text(path, "\n".join(lines) + _kept_sections(path))


def _kept_sections(path: Path) -> str:
    """The sections of an existing report that other commands write, kept: the convergence comparison
    (``gradconflict compare``) and the clustered-bins comparison (``gradconflict reproduce --bins-file``)."""
    from ..comparison.report import BEGIN, END
    from .clustered import BEGIN as CLUSTERED_BEGIN, END as CLUSTERED_END

    text = path.read_text() if path.is_file() else ""
    kept = ""
    for begin, end in ((BEGIN, END), (CLUSTERED_BEGIN, CLUSTERED_END)):
        if begin in text and end in text:
            kept += "\n" + text[text.index(begin):text.index(end) + len(end)] + "\n"
    return kept


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{v:+.4g}" if v == v else "n/a"


def _table(frame: pd.DataFrame) -> list[str]:
    cols = list(frame.columns)
    out = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for _, r in frame.iterrows():
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return out


def write_replicated_report(path: Path, config: Any, claims: pd.DataFrame, extras: dict) -> Path:
    """``REPORT.md`` for claims over independently trained models (``replicated.claims_over_models``): per claim
    the verdict, its range of validity (lam, unit, binning, training weighting), the controls, and the numbers
    with standard errors over models; the convergence section of ``gradconflict compare`` is kept."""
    tc, n = config.train, int(config.seeds)
    runs = config.transfer_runs()
    lines = [
        "# Reproduction report: gradient conflicts between diffusion timesteps",
        "",
        f"Preset `{config.name}`: {n} independently trained {tc.model} models (training seeds {tc.seed}..{tc.seed + n - 1}) "
        f"on {tc.data} {tc.image_size}x{tc.image_size}, {tc.steps} steps each, {tc.prediction}-prediction, trained with "
        f"{tc.weighting} weighting, {tc.schedule} schedule (T = {tc.T}), device {tc.device}. Tracking every "
        f"{config.every} steps: K = {config.track.bins} "
        f"{'clustered' if getattr(config, 'bins_edges', None) is not None else config.track.binning} bins, "
        f"{config.track.per_task} samples "
        f"per bin, {config.track.resamples} batches per checkpoint, task losses in {config.track.loss_space} units. "
        f"Transfer runs: " + "; ".join(f"`{k}` {v}" for k, v in runs.items()) + ".",
        "",
        f"The claims are those of Hang et al. (ICCV 2023) as read in [docs/claims.md]({_claims_link(path)}), which also "
        f"says how a verdict is formed. The replication unit is the model ({extras['unit']}): batches, checkpoints and "
        "matrix cells are nested inside a model; +- values are standard errors over models and intervals are 95% "
        "Student-t intervals over models. Numbers are in `claims.csv`.",
        "",
    ]
    if getattr(config, "bins_edges", None) is not None:
        edges = [int(e) for e in config.bins_edges]
        lines += [f"**Clustered bins.** Every bin-dependent stage ran under the K = {len(edges) - 1} bins of a bins file, "
                  f"edges {edges} (bin k holds t in [e_k, e_k+1)), on the same trained models as the uniform analysis "
                  "in `../` (the tracking Grams recomputed from their saved snapshots): tracking, transfer, C2, C3 "
                  "and the held-out check. C3's binning controls (log-SNR / other K) are skipped here: they are a "
                  "control of their own bins, reported with the uniform analysis. The comparison with the uniform "
                  "bins is in `../REPORT.md` and `../clustered_vs_uniform.csv`.", ""]
    if n < extras["min_models"]:
        lines += [f"**This run has {n} model(s): no claim can be decided.** Every verdict below is *undecided* (not "
                  f"replicated): a verdict needs >= {extras['min_models']} independently trained models. What one short "
                  "run can show is the direction of each effect on this one model, not whether it holds; use "
                  "`gradconflict reproduce --standard` for verdicts.", ""]
    lines += ["| claim | verdict | statistic | s.e. | models | range of validity | notes |", "|---|---|---|---|---|---|---|"]
    validity = (f"{tc.model}, {tc.data} {tc.image_size}px, trained with {tc.weighting} weighting "
                f"({tc.prediction}-prediction)")
    for _, c in claims.iterrows():
        rng = validity + (f"; {c['lam_rule']}" if isinstance(c["lam_rule"], str) and c["lam_rule"] else "")
        cells = [str(c["claim"]), f"**{c['verdict']}**", _fmt(c["statistic"]), _fmt(c["stderr"]), str(c["n_models"]),
                 rng, str(c["notes"])]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    learned = extras.get("learned")
    if learned is not None and len(learned):
        per = learned.groupby("model").agg(worst_ratio=("ratio", "max"), bins_learned=("learned", "sum"),
                                           bins=("learned", "size"), held_out=("held_out", "first")).reset_index()
        lines += ["", "## Did the models learn?", "",
                  f"Held-out loss per bin in the model's own units divided by that of predicting zero (eps_hat = 0 for "
                  f"an eps model: loss 1); a bin counts as learned below {extras['learned_factor']}. `learned.csv` "
                  "has every bin (and `ratio_x0_zero`, against x0_hat = 0 in x0 units); "
                  "`samples.png` shows model 0's DDIM samples. `held_out` True: images after the training images, "
                  "never trained on; False: the data has no images beyond the training ones, so the last training "
                  "images were used.", "",
                  *_table(per)]
    binning = extras["binning"]
    lines += ["", "## C3 controls", "",
              f"Primary figure `c3_lam_path.png` / `.csv`: every strategy's ratio to the optimum along the lam path "
              f"(mean over models, band min-max), the diagonal-only null, the rank, the regularizer's share and the "
              f"diag(G) range (the problem's conditioning). lam rule: {extras['lam_rule']:.3g} x trace(G)/K (per model "
              + ", ".join(f"{v:.3g}" for v in extras["per_model_rule"]) + "). `c3_gamma_sweep.png`: Min-SNR-gamma and "
              "soft-Min-SNR-gamma against gamma beside P2. Binning and loss-space variants (`c3_binning.csv`, each at "
              "its own lam rule; mean ratio over models +- se):", ""]
    pivot = binning.assign(cell=[f"{r:.3g} +- {s:.2g}" for r, s in zip(binning["ratio"], binning["se"])]).pivot_table(
        index=["binning", "lam", "verdict"], columns="strategy", values="cell", aggfunc="first").reset_index()
    lines += _table(pivot)
    lines += ["", "## C1 per model", "", "Near and far transfer per model and run (`c1_models.csv`; first-order "
              "columns: Pearson / Spearman between the measured cells and lr c_i G_ij / L_j):", ""]
    keep = [c for c in ("run", "model", "near_mean", "near_median", "far_mean", "far_median", "far_smaller_mean",
                        "far_larger_mean", "pearson", "spearman", "sign_disagree") if c in extras["c1"].columns]
    lines += _table(extras["c1"][keep])
    lines += ["", "## Figures", "",
              "- `fig2_transfer.png` / `.csv`: cross-bin transfer, pooled over models and seeds (C1)"
              + ("; " + ", ".join(f"`fig2_transfer_{k}.png`" for k in list(runs)[1:]) + ": the other optimizer(s)."
                 if len(runs) > 1 else "."),
              "- `fig3_online_weights.png` / `.csv`: online UGD through model 0's checkpoints beside the exact optima "
              "of the same small batches and of a large batch, with regrets (C2).",
              "- `c3_lam_path.png` / `.csv` (C3's primary figure), `c3_gamma_sweep.png` / `.csv`, `c3_binning.csv`.",
              "- `fig3_ugd_weights`, `fig4_pareto_objective`, `lambda_sweep`, `conflict_vs_distance`, `cosine_final`, "
              "`samples.png`: model 0's tracking run.",
              "- `c1_models.csv`, `c2_models.csv`, `learned.csv`: per-model numbers behind the claims.", ""]
    return write_text(path, "\n".join(lines) + _kept_sections(path))

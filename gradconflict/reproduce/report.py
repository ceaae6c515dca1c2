"""``figures/REPORT.md``: one verdict per claim, the numbers behind it, and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .._io import write_text

__all__ = ["write_report", "VERDICT_HOLDS", "VERDICT_FAILS"]

VERDICT_HOLDS = "**holds**"
VERDICT_FAILS = "**does not hold**"


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
        "Claims of Hang et al. (ICCV 2023), as described in [docs/claims.md](../docs/claims.md). The numbers are in `claims.csv`; they are "
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
    """The convergence comparison's section of an existing report (``gradconflict compare`` writes it), kept."""
    from ..comparison.report import BEGIN, END

    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        return "\n" + text[text.index(BEGIN):text.index(END) + len(END)] + "\n"
    return ""

"""Figures, ``claims.csv`` rows C4-C6 and the REPORT.md section of a comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .._io import write_csv, write_text
from .claims import claim_c4, claim_c5, claim_c6, convergence_table
from .config import CompareConfig
from .figures import fig5_convergence, fig6_loss_per_timestep, score_vs_speed

__all__ = ["write_report", "CLAIM_COLUMNS"]

CLAIM_COLUMNS = ("claim", "verdict", "statistic", "stderr", "n_models", "unit", "lam_rule", "notes")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def _claims(evals: pd.DataFrame, config: CompareConfig) -> tuple[list[dict], dict[str, pd.DataFrame]]:
    rows, tables = [], {}
    metrics = [m for m in ("fd_mnist", "loss_x0") if evals[m].notna().any()]
    for metric in metrics:
        for name, claim in (("c4", claim_c4), ("c5", claim_c5), ("c6", claim_c6)):
            try:
                row, table = claim(evals, metric=metric)
            except ValueError as err:  # a claim whose weightings this comparison did not train
                row, table = {"claim": f"{name.upper()} ({metric})", "verdict": "not measured", "notes": str(err)}, None
            row["lam_rule"] = f"lam = {config.lam:g} x trace(G)/K (x0 units)" if name == "c5" else ""
            rows.append(row)
            if table is not None:
                tables[f"{name}_{metric}"] = table
    return rows, tables


def _merge_claims(path: Path, rows: list[dict]) -> pd.DataFrame:
    """``claims.csv`` with the rows of C4-C6 replaced by ``rows`` (C1-C3 of ``reproduce`` kept)."""
    new = pd.DataFrame(rows).reindex(columns=list(CLAIM_COLUMNS))
    if path.is_file():
        old = pd.read_csv(path)
        old = old[~old["claim"].astype(str).str.match(r"C[456]\b")]
        new = pd.concat([old, new], ignore_index=True)
    return new


def _section(config: CompareConfig, rows: list[dict], summary: pd.DataFrame, metric: str) -> str:
    lines = [BEGIN, "## Convergence under each weighting (C4-C6)", "",
             f"`gradconflict compare`: {config.model} on {config.image_size}x{config.image_size} {config.data}, "
             f"{config.prediction}-prediction, {config.steps} steps of batch {config.batch_size}, "
             f"{config.seeds} seeds per weighting (the replication unit: an independently trained model), evaluated "
             f"every {config.eval_every} steps on the {config.data} images after the first {config.train_images} "
             f"(held out) with the {config.weights.upper()} weights. FD-MNIST is a Fréchet distance in the features "
             "of a small MNIST classifier (see docs/metrics.md), not Inception FID. Claims are described in "
             "docs/claims.md.", ""]
    present = set(summary["weighting"]) if "weighting" in summary else set()
    missing = [w for w in config.weightings if w not in present]
    if missing:
        lines += [f"**Part-way:** {len(present)} of the {len(config.weightings)} weightings have all their runs; not yet "
                  f"trained: {', '.join(missing)} (rerun the same `gradconflict compare` command to complete them).", ""]
    lines += ["| claim | verdict | statistic | s.e. | models | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        stat = row.get("statistic")
        se = row.get("stderr")
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) and v == v else ""  # noqa: E731
        lines.append(f"| {row['claim']} | {row['verdict']} | {fmt(stat)} | {fmt(se)} | {row.get('n_models', '')} | "
                     f"{row.get('notes', '')} |")
    name = {"fd_mnist": "FD-MNIST", "loss_x0": "held-out loss (x0 units)"}[metric]
    lines += ["", f"Final {name}, its average over evaluations (auc) and seconds per training step, per weighting "
              "(mean over seeds; s.e. over seeds):", "", summary.to_markdown(index=False, floatfmt=".4g")
              if hasattr(summary, "to_markdown") and _has_tabulate() else "```\n" + summary.to_string(index=False) + "\n```",
              "", END]
    return "\n".join(lines)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(evals: pd.DataFrame, per_bin: pd.DataFrame, config: CompareConfig, figures: str | Path) -> dict[str, Any]:
    """Write ``fig5_convergence``, ``fig6_loss_per_timestep``, ``score_vs_speed`` (PNG + CSV), ``compare_evals.csv``
    (every run's evaluations), the C4-C6 rows of ``claims.csv`` and the comparison's section of ``REPORT.md`` into
    ``figures``; returns the claim rows."""
    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    subtitle = (f"{config.model}, {config.data} {config.image_size}x{config.image_size}, {config.prediction}-prediction, "
                f"batch {config.batch_size}, lr {config.lr:g}")
    fig5_convergence(evals, figures / "fig5_convergence", subtitle=subtitle)
    fig6_loss_per_timestep(per_bin, figures / "fig6_loss_per_timestep", subtitle=subtitle)
    rows, tables = _claims(evals, config)
    metric = "fd_mnist" if evals["fd_mnist"].notna().any() else "loss_x0"
    if f"c5_{metric}" in tables:
        score_vs_speed(tables[f"c5_{metric}"], figures / "score_vs_speed", metric=metric, subtitle=subtitle)
    for name, table in tables.items():
        write_csv(table, figures / f"compare_{name}.csv")
    write_csv(evals, figures / "compare_evals.csv")  # every run's evaluations (weighting, seed, step): the data
    summary = convergence_table(evals, metric)
    write_csv(summary, figures / "compare_summary.csv")
    write_csv(_merge_claims(figures / "claims.csv", rows), figures / "claims.csv")
    report = figures / "REPORT.md"
    text = report.read_text() if report.is_file() else "# Report\n"
    section = _section(config, rows, summary, metric)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(report, text)
    return {"claims": rows, "tables": tables, "summary": summary}

"""Clustered bins against uniform bins: ``figures/clustered_vs_uniform.csv`` and a section of ``figures/REPORT.md``.

``gradconflict reproduce --bins-file BINS.csv`` analyses the same trained models under the bins of the file and
writes ``figures/clustered/`` (its own ``claims.csv`` and ``REPORT.md``). This module reads the two analysis
folders back (the uniform ``figures/`` and ``figures/clustered/``) and puts side by side, per claim:

* each C1, C2 and C3 row of ``claims.csv`` (C1's statistic: the mean far transfer over models; C2's: the paired
  difference of the consecutive-iteration L1; C3's: the paired ratio difference runner-up - min_snr_5);
* ``C1 near``: the mean near transfer (``|i - j| = 1``) over models of the primary transfer run
  (``c1_models.csv``), with its 95% t-interval verdict (holds: above 0);
* ``C3 ranking``: the fixed strategies ordered by their mean ratio to the optimum at C3's lam rule
  (``c3_lam_path.csv`` at the lam of C3's ``lam_rule``; statistic and s.e.: the lowest one's mean ratio).

A row "moved" when its verdict (for the ranking: the order) differs between the binnings, else "same".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from .._io import write_text
from ..plots import write_csv
from .c1 import _sign_verdict, over_models

__all__ = ["BEGIN", "END", "COMPARISON_COLUMNS", "analysis_rows", "comparison_frame", "write_clustered_comparison"]

BEGIN, END = "<!-- clustered:begin -->", "<!-- clustered:end -->"
COMPARISON_COLUMNS = ("claim", "binning", "verdict", "statistic", "stderr", "n_models")
_CLAIM = re.compile(r"^C[123]\b")


def _c1_near(figures: Path) -> Optional[dict]:
    path = figures / "c1_models.csv"
    if not path.is_file():
        return None
    c1 = pd.read_csv(path)
    primary = c1[c1["run"] == c1["run"].iloc[0]] if "run" in c1.columns else c1
    s = over_models(primary["near_mean"].to_numpy())
    return {"claim": "C1 near", "verdict": _sign_verdict(s, +1, s["n"]), "statistic": s["mean"], "stderr": s["se"],
            "n_models": s["n"]}


def _c3_ranking(figures: Path, claims: pd.DataFrame) -> Optional[dict]:
    path = figures / "c3_lam_path.csv"
    c3 = claims[claims["claim"] == "C3"]
    found = re.search(r"lam = ([0-9.eE+-]+) x", str(c3["lam_rule"].iloc[0])) if len(c3) else None
    if not path.is_file() or found is None:
        return None
    lam_path = pd.read_csv(path)
    lams = np.unique(lam_path["lam"].to_numpy(np.float64))
    lam = lams[np.argmin(np.abs(np.log(lams) - np.log(float(found.group(1)))))]  # the grid lam the rule printed
    here = lam_path[np.isclose(lam_path["lam"], lam, rtol=1e-12)].sort_values("ratio_mean", kind="stable")
    best = here.iloc[0]
    return {"claim": "C3 ranking", "verdict": " < ".join(here["strategy"].astype(str)),
            "statistic": float(best["ratio_mean"]), "stderr": float(best["ratio_se"]), "n_models": int(best["n_models"])}


def analysis_rows(figures: Path, binning: str) -> pd.DataFrame:
    """The rows (``COMPARISON_COLUMNS``) of one analysis folder ``figures`` (with its ``claims.csv``): its C1-C3
    claims, ``C1 near`` and ``C3 ranking``, labelled ``binning``; empty when there is no ``claims.csv``."""
    path = figures / "claims.csv"
    if not path.is_file():
        return pd.DataFrame(columns=list(COMPARISON_COLUMNS))
    claims = pd.read_csv(path)
    rows = [{k: r[k] for k in ("claim", "verdict", "statistic", "stderr", "n_models")}
            for _, r in claims[claims["claim"].astype(str).str.match(_CLAIM)].iterrows()]
    rows += [r for r in (_c1_near(figures), _c3_ranking(figures, claims)) if r is not None]
    order = {"C1 near": 0.5, "C3 ranking": 2.5}  # beside their claims
    rows.sort(key=lambda r: order.get(r["claim"], {"C1": 0, "C2": 1, "C3": 2}.get(r["claim"], 3)))
    return pd.DataFrame([{**r, "binning": binning} for r in rows]).reindex(columns=list(COMPARISON_COLUMNS))


def comparison_frame(figures: Path) -> pd.DataFrame:
    """The tidy comparison: :func:`analysis_rows` of ``figures`` ("uniform") and ``figures/clustered``
    ("clustered")."""
    parts = [analysis_rows(figures, "uniform"), analysis_rows(figures / "clustered", "clustered")]
    return pd.concat([p for p in parts if len(p)], ignore_index=True).reindex(columns=list(COMPARISON_COLUMNS))


def _cell(row: Optional[pd.Series]) -> tuple[str, str]:
    if row is None:
        return "n/a", "n/a"
    if row.name == "C3 ranking":
        return f"{row['verdict']} (lowest ratio {row['statistic']:.4g} +- {row['stderr']:.2g})", "-"
    se = f"{row['stderr']:.2g}" if np.isfinite(row["stderr"]) else "n/a"
    return f"{row['statistic']:+.4g} +- {se}", f"**{row['verdict']}**"


def _k_of(figures: Path) -> str:
    path = figures / "c1_models.csv"
    return str(int(pd.read_csv(path)["K"].iloc[0])) if path.is_file() else "?"


def comparison_section(figures: Path, edges: Any, frame: pd.DataFrame) -> str:
    """The Markdown section (between ``BEGIN`` and ``END``) comparing the two analyses of ``frame``."""
    edges = [int(e) for e in edges]
    lines = [BEGIN, "## Clustered bins against uniform bins", "",
             f"The same trained models (no retraining: the tracking Grams are recomputed from the saved snapshots) "
             f"analysed under the K = {len(edges) - 1} bins of a bins file, edges {edges} (t in [e_k, e_k+1)), in "
             "`clustered/` (its own `claims.csv`, `REPORT.md` and figures; C3's binning controls are skipped there, "
             "they are a separate control of their own bins). Numbers: `clustered_vs_uniform.csv`; +- is the "
             "standard error over models. \"moved\": the verdict (for the ranking: the order at the lam rule) differs."]
    uniform = frame[frame["binning"] == "uniform"].set_index("claim")
    clustered = frame[frame["binning"] == "clustered"].set_index("claim")
    if uniform.empty:
        lines += ["", "There is no uniform `claims.csv` in this folder yet: nothing to compare against. Run the same "
                  "`gradconflict reproduce` command without `--bins-file` (it reuses the trained models), then this "
                  "one again."]
    else:
        lines += ["", f"| claim | uniform (K = {_k_of(figures)}) | verdict | clustered (K = {len(edges) - 1}) | "
                  "verdict | |", "|---|---|---|---|---|---|"]
        for claim in [*uniform.index, *[c for c in clustered.index if c not in uniform.index]]:
            u = uniform.loc[claim] if claim in uniform.index else None
            c = clustered.loc[claim] if claim in clustered.index else None
            moved = "n/a" if u is None or c is None else ("same" if u["verdict"] == c["verdict"] else "moved")
            name = {"C1": "C1 far transfer", "C3 ranking": "C3 ranking at the lam rule"}.get(claim, claim)
            cells = [name, *_cell(u), *_cell(c), moved]
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines + [END])


def write_clustered_comparison(figures: Path, edges: Any) -> pd.DataFrame:
    """Write ``figures/clustered_vs_uniform.csv`` and put the comparison section into ``figures/REPORT.md``
    (replacing the one there; created when there is no report). ``edges``: the clustered bins' K + 1 edges."""
    frame = comparison_frame(figures)
    write_csv(frame, figures / "clustered_vs_uniform.csv")
    report = figures / "REPORT.md"
    text = report.read_text() if report.is_file() else "# Reproduction report: gradient conflicts between diffusion timesteps\n"
    section = comparison_section(figures, edges, frame)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(report, text)
    return frame

"""Induction-head figures, each from the induction tables alone."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.plots import save_figure


def _json(path) -> dict:
    return json.loads(Path(path).read_text())


def plot_heatmap(paths, out) -> None:
    """Mean induction score per layer and head (from profile.json)."""
    p = _json(paths[0])
    scores = np.asarray(p["head_scores"])
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * scores.shape[1], 1.2 + 0.2 * scores.shape[0]))
    im = ax.imshow(scores, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(scores.shape[1]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="induction score (attention t -> s)")
    ax.set_title(f"{p['model']}: induction scores ({p['prompts']} prompts)", fontsize=9)
    save_figure(fig, out)


def _profile_axes(ax, p, label=None, color=None, band=True):
    x = np.asarray(p.get("relative_depth") or np.arange(len(p["profile"])) / len(p["profile"]))
    line = ax.plot(x, p["profile"], marker=".", label=label, color=color)[0]
    if band and "profile_lo" in p:
        ax.fill_between(x, p["profile_lo"], p["profile_hi"], alpha=0.25, color=line.get_color())
    return line


def plot_profile(paths, out) -> None:
    """Layer profile on relative depth with its bootstrap band, the peak and the FWHM."""
    p = _json(paths[0])
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    line = _profile_axes(ax, p, label=f"{p['how']} over heads")
    lo, hi = p["peak_depth_ci"]
    ax.axvline(p["peak_depth"], color=line.get_color(), ls="--", lw=1)
    ax.axvspan(lo, hi, color=line.get_color(), alpha=0.1)
    ax.set_xlabel("relative depth (layer / layers)")
    ax.set_ylabel("induction score")
    ax.set_title(
        f"{p['model']}: peak {p['peak_depth']:.2f} [{lo:.2f}, {hi:.2f}], bandwidth "
        f"{p['bandwidth']:.2f} [{p['bandwidth_ci'][0]:.2f}, {p['bandwidth_ci'][1]:.2f}] "
        "(95% bootstrap over prompts)",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    save_figure(fig, out)


def plot_nulls(paths, out) -> None:
    """Observed profile against the shuffled-antecedent and head-permutation null bands
    (profile.json, nulls.json)."""
    p, n = _json(paths[0]), _json(paths[1])
    x = np.asarray(p["relative_depth"])
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    ax.plot(x, p["profile"], marker=".", color="k", label="observed")
    s = n["shuffled_antecedent"]
    ax.plot(x, s["profile"], color="tab:orange", label="shuffled antecedent")
    ax.fill_between(x, s["lo"], s["hi"], color="tab:orange", alpha=0.3)
    h = n["head_permutation"]
    ax.plot(x, h["mean"], color="tab:blue", ls=":", label="heads permuted")
    ax.fill_between(x, h["lo"], h["hi"], color="tab:blue", alpha=0.2)
    ax.set_xlabel("relative depth (layer / layers)")
    ax.set_ylabel("induction score")
    ax.set_title(f"{p['model']}: observed profile against 95% null bands", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, out)


def plot_cross_model(paths, out) -> None:
    """Every model's profile on relative depth, each scaled to its own maximum."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    for path in paths:
        p = _json(path)
        peak = max(p["profile"]) or 1.0
        scaled = {k: list(np.asarray(p[k]) / peak) for k in ("profile", "profile_lo", "profile_hi")}
        line = _profile_axes(
            ax,
            p | scaled,
            label=f"{p['model']} ({p['n_layers']} layers): peak {p['peak_depth']:.2f} "
            f"[{p['peak_depth_ci'][0]:.2f}, {p['peak_depth_ci'][1]:.2f}], "
            f"FWHM {p['bandwidth']:.2f}",
        )
        ax.axvline(p["peak_depth"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("relative depth (layer / layers)")
    ax.set_ylabel("induction profile / its maximum")
    ax.set_title("Induction heads across models (bands: 95% bootstrap over prompts)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, out)


def plot_causal(paths, out) -> None:
    """Change in copy accuracy when the top-k induction heads, or k random heads, are
    ablated; 95% intervals over prompts; a group per model."""
    results = [_json(p) for p in paths]
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(results), 3.6), layout="constrained")
    width = 0.38
    for i, r in enumerate(results):
        for j, (key, label, color) in enumerate(
            (("topk", f"top-{r['k']}", "tab:red"), ("random", f"random {r['k']}", "tab:gray"))
        ):
            d, (lo, hi) = r[f"delta_{key}"], r[f"delta_{key}_ci"]
            ax.bar(
                i + (j - 0.5) * width,
                d,
                width,
                yerr=[[d - lo], [hi - d]],
                capsize=4,
                color=color,
                label=label if i == 0 else None,
            )
        ax.text(i, 0.01, f"baseline {r['baseline']:.2f}", ha="center", fontsize=7)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xticks(range(len(results)), [r["model"] for r in results])
    ax.set_ylabel("change in copy accuracy")
    mode = results[0]["mode"]
    ax.set_title(f"Head ablation ({mode}, before o_proj), 95% bootstrap over prompts", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, out)


def plot_lag(paths, out) -> None:
    """Profiles for short (<= the profile's ``short_lag``) and long lags, a panel per
    model, with the previous-token profile (attention from t to t - 1 at the same
    queries) beside them and, per lag, the correlation across heads of induction and
    previous-token scores."""
    profiles = [_json(p) for p in paths]
    fig, axes = plt.subplots(
        1, len(profiles), figsize=(4.2 * len(profiles), 3.8), squeeze=False, layout="constrained"
    )
    for ax, p in zip(axes[0], profiles, strict=True):
        for name, color in (("short", "tab:green"), ("long", "tab:purple")):
            if name in p["lags"]:
                q = p["lags"][name] | {"relative_depth": p["relative_depth"]}
                _profile_axes(ax, q, label=f"{name} lags: peak {q['peak_depth']:.2f}", color=color)
        if "prev_head_scores" in p:
            prev = np.asarray(p["prev_head_scores"]).mean(-1)
            ax.plot(
                p["relative_depth"], prev, color="0.4", ls="--", lw=1, label="previous token (t-1)"
            )
        note = "\n".join(
            f"lag {lag}: r = {c['r']:.2f}, top-{c['top']} shared {c['top_shared']}"
            for lag, c in p.get("by_lag", {}).items()
        )
        ax.set_title(
            p["model"] + ("\ninduction vs previous-token, across heads:\n" + note if note else ""),
            fontsize=7,
        )
        ax.set_xlabel("relative depth")
        ax.set_ylabel("mean score over heads")
        ax.legend(fontsize=7)
    split = profiles[0]["short_lag"]
    fig.suptitle(
        f"Induction profile by lag (short <= {split} < long) and the previous-token profile",
        fontsize=9,
    )
    save_figure(fig, out)


FIGURES = {
    "induction-heatmap": plot_heatmap,
    "induction-profile": plot_profile,
    "induction-nulls": plot_nulls,
    "induction-cross-model": plot_cross_model,
    "induction-causal": plot_causal,
    "induction-lag": plot_lag,
}


def render(
    figure: str, table: list[str], out: str, sparsity=None, resamples=None, seed=None
) -> None:
    """Draw the induction figure ``figure`` from the JSON tables ``table`` to ``out``."""
    FIGURES[figure](table, out)

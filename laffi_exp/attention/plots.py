"""The attention analysis's figures: ``layers.png`` (each measure per layer, base vs fine-tuned, 95% CIs
over prompts), ``heads_delta.png`` (fine-tuned − base per layer x head) and ``example_<id>.png`` (one
prompt's attention map with its segments, base beside fine-tuned)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laffi_exp.attention.analysis import MODELS, Analysis
from laffi_exp.attention.measures import MEASURES, SCOPES
from laffi_exp.attention.segments import PROMPTS, SegmentedPrompt
from laffi_exp.core.io import atomic_savefig

PANELS = [(kind, scope) for kind in PROMPTS for scope in SCOPES]
COLORS = {"base": "C7", "fine_tuned": "C0"}
UNITS = {"distance": "tokens", "entropy": "nats"}


def _save(fig, path: Path) -> Path:
    return atomic_savefig(fig, path, dpi=100)


def _run(analysis: Analysis) -> str:
    return f"{analysis.run_dir.name} ({analysis.method}, {Path(analysis.model_name).name})"


def _title(kind: str, scope: str) -> str:
    from laffi_exp.attention.report import SCOPE_LABELS

    return f"{kind} prompt, {SCOPE_LABELS[scope]}"


def plot_layers(analysis: Analysis, path: Path) -> Path:
    """One panel per measure (rows) and prompt x positions (columns): the mean over heads per layer, base
    and fine-tuned, with 95% CIs over prompts (Student t)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state (this runs inside Hydra jobs too)

    from laffi_exp.attention.report import per_layer, t_interval

    stats = {key: t_interval(per_layer(v)) for key, v in analysis.values.items()}  # each (layers, scopes, measures)
    x = np.asarray(analysis.layers, dtype=float)
    # A fixed layout: a layout engine would cost more than the drawing itself for this many panels.
    fig = Figure(figsize=(3.4 * len(PANELS), 2.0 * len(MEASURES)))
    axes = fig.subplots(len(MEASURES), len(PANELS), squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.04, top=0.95, wspace=0.28, hspace=0.18)
    for m, measure in enumerate(MEASURES):
        for c, (kind, scope) in enumerate(PANELS):
            ax, s = axes[m, c], SCOPES.index(scope)
            for offset, name in zip((-0.08, 0.08), MODELS):
                _, mean, low, high = stats[(kind, name)]
                y = mean[:, s, m]
                if np.all(np.isnan(y)):
                    continue
                err = np.nan_to_num(np.stack([y - low[:, s, m], high[:, s, m] - y]))
                ax.errorbar(
                    x + offset,
                    y,
                    yerr=err,
                    marker="o",
                    markersize=3,
                    capsize=2,
                    color=COLORS[name],
                    label=name.replace("_", "-"),
                )
            if not ax.has_data():
                ax.text(0.5, 0.5, "not in this prompt", ha="center", va="center", transform=ax.transAxes, color="0.5")
            if m == 0:
                ax.set_title(_title(kind, scope), fontsize="medium")
            if c == 0:
                ax.set_ylabel(measure + (f" ({UNITS[measure]})" if measure in UNITS else ""))
            ax.grid(alpha=0.3)
            ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
    axes[0, 0].legend(fontsize="x-small")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
        ax.set_xticks(analysis.layers)
    fig.suptitle(
        f"{_run(analysis)}: attention per layer (mean over heads), {len(analysis.ids)} prompts, mean and 95% CI"
    )
    return _save(fig, path)


def plot_heads_delta(analysis: Analysis, path: Path) -> Path:
    """One heat map per headline measure (rows) and prompt x positions (columns): fine-tuned − base per
    layer (rows) and head (columns), the mean over prompts of the per-prompt difference."""
    from matplotlib.figure import Figure

    from laffi_exp.attention.report import HEADLINE, _nanmean

    fig = Figure(figsize=(3.4 * len(PANELS) + 1.0, 1.2 + (0.6 + 0.25 * len(analysis.layers)) * len(HEADLINE)))
    axes = fig.subplots(len(HEADLINE), len(PANELS), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.06, top=0.93, wspace=0.25, hspace=0.45)
    # (layers, scopes, measures, heads) per prompt: the mean over prompts of the per-prompt difference
    delta = {
        kind: _nanmean(analysis.values[(kind, "fine_tuned")] - analysis.values[(kind, "base")], 0) for kind in PROMPTS
    }
    for r, measure in enumerate(HEADLINE):
        grids = [delta[kind][:, SCOPES.index(scope), MEASURES.index(measure), :] for kind, scope in PANELS]
        finite = [np.abs(g[~np.isnan(g)]) for g in grids]
        limit = max((float(f.max()) for f in finite if f.size), default=0.0) or 1e-9  # one symmetric scale per row
        for c, ((kind, scope), grid) in enumerate(zip(PANELS, grids)):
            ax = axes[r, c]
            image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(analysis.layers)), [str(layer) for layer in analysis.layers], fontsize="x-small")
            ax.set_xticks(range(analysis.heads), [str(h) for h in range(analysis.heads)], fontsize="x-small")
            if r == 0:
                ax.set_title(_title(kind, scope), fontsize="medium")
            if c == 0:
                ax.set_ylabel(f"Δ {measure}\nlayer")
            if r == len(HEADLINE) - 1:
                ax.set_xlabel("head")
        fig.colorbar(image, ax=list(axes[r]), fraction=0.02, pad=0.01)
    fig.suptitle(f"{_run(analysis)}: fine-tuned − base per layer and head (mean over {len(analysis.ids)} prompts)")
    return _save(fig, path)


def token_labels(prompt: SegmentedPrompt) -> list[str]:
    """Each token's segment: "sink" for the first, else template, context, question or prediction."""
    labels = ["sink"] + ["template"] * (prompt.length - 1)
    for name in ("context", "question", "prediction"):
        for t in np.flatnonzero(prompt.masks[name]):
            labels[t] = name
    return labels


def _runs(labels: list[str]) -> list[tuple[str, int, int]]:
    """Maximal runs of one label: (label, first, last + 1)."""
    runs, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            runs.append((labels[start], start, t))
            start = t
    return runs


def plot_example(analysis: Analysis, index: int, path: Path) -> Path:
    """The head-averaged attention of the last analysed layer on one prompt: rows the answer and the
    feedback prompt, columns base and fine-tuned; lines at segment boundaries, the gold span in orange.
    The colour scale is a square root, so that attention off the sink is visible."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 12.5))
    axes = fig.subplots(len(PROMPTS), len(MODELS), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.08, top=0.93, wspace=0.25, hspace=0.3)
    layer = analysis.layers[-1]
    for r, kind in enumerate(PROMPTS):
        prompt = analysis.prompts[kind][index]
        runs = _runs(token_labels(prompt))
        gold = np.flatnonzero(prompt.masks["gold"])
        maps = [analysis.maps[(kind, name)][index][-1] for name in MODELS]
        vmax = max(float(m[:, 1:].max()) for m in maps) or 1.0  # the sink would flatten every other cell
        for c, (name, attn) in enumerate(zip(MODELS, maps)):
            ax = axes[r, c]
            attn = np.where(np.triu(np.ones_like(attn, dtype=bool), 1), np.nan, attn)  # future keys: blank, not 0
            image = ax.imshow(attn, cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=vmax), interpolation="nearest")
            for _, start, _ in runs[1:]:
                ax.axhline(start - 0.5, color="white", linewidth=0.6, alpha=0.8)
                ax.axvline(start - 0.5, color="white", linewidth=0.6, alpha=0.8)
            if gold.size:
                for edge in (gold[0] - 0.5, gold[-1] + 0.5):
                    ax.axvline(edge, color="orange", linewidth=1.0, linestyle="--")
            ticks = [(start + end - 1) / 2 for label, start, end in runs if end - start >= 3 or label == "prediction"]
            names = [label for label, start, end in runs if end - start >= 3 or label == "prediction"]
            ax.set_xticks(ticks, names, rotation=90, fontsize="x-small")
            ax.set_yticks(ticks, names, fontsize="x-small")
            ax.set_title(f"{kind} prompt, {name.replace('_', '-')} (layer {layer}, mean over heads)", fontsize="medium")
            ax.set_xlabel("key")
            ax.set_ylabel("query")
        fig.colorbar(image, ax=list(axes[r]), fraction=0.03, pad=0.02, label="attention (√ scale)")
    first = analysis.prompts[PROMPTS[0]][index]
    asked = "".join(first.text[s:e] for s, e in first.spans.get("question", [])[:1])
    fig.suptitle(
        f"{_run(analysis)}, question {analysis.ids[index]}: {asked[:100]}"
        + (" (gold span: orange)" if analysis.answerable[index] else " (unanswerable)")
    )
    return _save(fig, path)


def write_plots(analysis: Analysis, out: Path) -> list[Path]:
    from laffi_exp.attention.report import safe_name

    files = [plot_layers(analysis, out / "layers.png"), plot_heads_delta(analysis, out / "heads_delta.png")]
    for i in analysis.example_indices:
        files.append(plot_example(analysis, i, out / f"example_{safe_name(analysis.ids[i])}.png"))
    return files

"""`kiln report --out DIR`'s plots: matplotlib figures of one or more runs' metrics records.

`figures(runs)` builds them (a test counts their lines before anything is drawn to pixels);
`save(figs, out)` writes each as DIR/<name>.png and returns the PNG bytes. The figures, each left
out when no run has its data:

  loss          train and eval loss against tokens; dotted vertical lines where a run grew
  throughput    learning rate, tokens/s and MFU against tokens (growth lines too)
  expert_load   per run, the last window's share of token-choices per layer and expert (MoE)
  buckets       per run, the row length of every step against the step (data.packing=decompose)

Every run is drawn on the same axes in its own colour, labelled by its name. Figures are built on
matplotlib's Agg canvas directly, not through pyplot: no backend choice, no global figure state.
This module imports matplotlib at the top; the command imports it only when --out asks for plots.
"""
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
CAPTIONS = {
    "loss": "Loss against tokens: train (solid) and held-out eval (dashed, dots); dotted lines mark growth.",
    "throughput": "Learning rate, global tokens/s and MFU against tokens.",
    "expert_load": "Expert load: each layer's share of token-choices per expert in the last logged window "
                   "(1 / experts is perfectly balanced).",
    "buckets": "Bucket schedule (dataset decomposition): the row length of every step.",
}


class Run:
    """One run's records split by kind: train, eval, decomposition step and growth event records."""

    def __init__(self, name: str, records: list[dict]):
        self.name = name
        self.train = [r for r in records if "train/loss" in r]
        self.evals = [r for r in records if "eval/loss" in r]
        self.steps = [r for r in records if "data/seq_len" in r]
        self.events = [r for r in records if "growth/event" in r]
        self.loads = [r for r in self.train if r.get("moe/expert_load")]

    def tokens_at(self, step: int) -> float:
        """Tokens trained on at `step`, from the train records (old eval and event records lack them):
        interpolated between records, extended past the last at its mean tokens per step."""
        pts = [(r["step"], r["train/tokens"]) for r in self.train if "train/tokens" in r]
        if not pts:
            return float("nan")
        steps, toks = zip(*([(0, 0)] + pts))
        if step > steps[-1]:
            return toks[-1] + (step - steps[-1]) * toks[-1] / max(steps[-1], 1)
        return float(np.interp(step, steps, toks))

    def x(self, r: dict) -> float:
        """The tokens axis position of a record."""
        return r["train/tokens"] if "train/tokens" in r else self.tokens_at(r["step"])


def _series(run: Run, recs: list[dict], key: str):
    """(tokens, values) of the records that hold `key`."""
    pts = [(run.x(r), r[key]) for r in recs if r.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _growth_lines(ax, run: Run, colour: str) -> None:
    """A dotted vertical line at the tokens of each growth event of the run."""
    for e in run.events:
        ax.axvline(run.x(e), color=colour, linestyle=":", linewidth=1.5, gid="growth",
                   label=f"{run.name} {e['growth/event']}")


def _legend(axes) -> None:
    """One legend, on the first panel that has labelled lines (an old run may lack a panel's metric)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
            return


def _figure(rows: int = 1, cols: int = 1, height: float = 4.5, width: float = 8.0):
    fig = Figure(figsize=(width, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def loss_figure(runs: list[Run]):
    """Train and eval loss against tokens, with growth markers; None when no run has a loss."""
    if not any(r.train or r.evals for r in runs):
        return None
    fig, axes = _figure()
    ax = axes[0, 0]
    for run, c in zip(runs, COLOURS * 10):
        xs, ys = _series(run, run.train, "train/loss")
        if xs:
            ax.plot(xs, ys, color=c, linewidth=1.5, gid="train", label=f"{run.name} train")
        xs, ys = _series(run, run.evals, "eval/loss")
        if xs:
            ax.plot(xs, ys, color=c, linestyle="--", marker="o", markersize=4, gid="eval", label=f"{run.name} eval")
        _growth_lines(ax, run, c)
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def throughput_figure(runs: list[Run]):
    """Learning rate, tokens/s and MFU (%) against tokens; None when no run logged any of them."""
    panels = [("train/lr", "learning rate"), ("perf/tokens_per_s", "tokens/s (global)"), ("perf/mfu_pct", "MFU (%)")]
    if not any(r.get(key) is not None for run in runs for r in run.train for key, _ in panels):
        return None
    fig, axes = _figure(rows=3, height=2.6)
    for (key, label), ax in zip(panels, axes[:, 0]):
        for run, c in zip(runs, COLOURS * 10):
            xs, ys = _series(run, run.train, key)
            if xs:
                ax.plot(xs, ys, color=c, linewidth=1.5, gid=key, label=run.name)
            _growth_lines(ax, run, c)
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("learning rate, throughput, MFU")
    _legend(axes[:, 0])
    axes[-1, 0].set_xlabel("tokens")
    return fig


def expert_load_figure(runs: list[Run]):
    """Per MoE run, the last window's layers x experts load as a heatmap; None without MoE runs."""
    moe = [r for r in runs if r.loads]
    if not moe:
        return None
    fig, axes = _figure(rows=len(moe), height=3.2)
    for run, ax in zip(moe, axes[:, 0]):
        last = run.loads[-1]
        load = np.asarray(last["moe/expert_load"], dtype=float)
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        layers, experts = load.shape
        if experts <= 32:  # one tick per expert while the labels fit; matplotlib's own beyond
            ax.set_xticks(range(experts))
        if layers <= 12:
            ax.set_yticks(range(layers))
        ax.set(xlabel="expert", ylabel="layer",
               title=f"{run.name}: expert load at step {last['step']} (balanced = {1 / experts:.3f})")
        fig.colorbar(im, ax=ax, label="share of token-choices")
    return fig


def buckets_figure(runs: list[Run]):
    """The row length of every decomposition step against the step; None without such steps."""
    if not any(r.steps for r in runs):
        return None
    fig, axes = _figure(height=4.0)
    ax = axes[0, 0]
    for run, c in zip(runs, COLOURS * 10):
        if run.steps:
            ax.plot([r["step"] for r in run.steps], [r["data/seq_len"] for r in run.steps], color=c,
                    drawstyle="steps-post", marker=".", markersize=4, gid="seq_len", label=run.name)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="step", ylabel="row length (tokens)", title="bucket schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


BUILDERS = {"loss": loss_figure, "throughput": throughput_figure, "expert_load": expert_load_figure,
            "buckets": buckets_figure}


def figures(runs: list[tuple[str, list[dict]]]) -> dict:
    """name -> matplotlib Figure for (run name, records) pairs; figures without data are left out."""
    rs = [Run(name, recs) for name, recs in runs]
    out = {name: build(rs) for name, build in BUILDERS.items()}
    return {name: fig for name, fig in out.items() if fig is not None}


def save(figs: dict, out: Path) -> dict[str, bytes]:
    """Write each figure as out/<name>.png; name -> the PNG's bytes."""
    pngs = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        pngs[name] = buf.getvalue()
        (Path(out) / f"{name}.png").write_bytes(pngs[name])
    return pngs

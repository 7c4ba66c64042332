"""`kiln report`: the text table, the plots (figures and PNGs) and the HTML page, on metrics files
built here with known contents (tests/trainer/test_report_html.py uses real runs and Chromium)."""
import base64
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import colors
from matplotlib import image as mpimg

from kiln.trainer.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T = 512  # tokens per step of the hand-built runs


def train_rec(step: int, new: bool = True, **extra) -> dict:
    """A train record of a run whose loss falls 0.1 per step from 6 (old: pre-catalogue names)."""
    loss, lr, tok_s, mfu = 6.0 - 0.1 * step, 1e-3 * min(1, step / 2), 1000.0 + 10 * step, 0.02 + 0.001 * step
    if not new:
        return {"step": step, "time": 1.0 * step, "loss": loss, "lr": lr, "grad_norm": 0.5, "tokens": T * step,
                "flops": 1e6 * step, "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": 0.4, "time/step_s": 0.1,
                "time/data_s": 0.01, "time/fwd_bwd_s": 0.08, "time/optim_s": 0.01, **extra}
    return {"step": step, "time": 1.0 * step, "train/loss": loss, "train/lr": lr, "train/grad_norm": 0.5,
            "train/tokens": T * step, "train/flops": 1e6 * step, "perf/tokens_per_s": tok_s,
            "perf/tokens_per_s_per_device": tok_s / 2, "perf/mfu_pct": 100 * mfu, "perf/mem_peak_gb": 0.4,
            "perf/step_s": 0.1, "perf/data_s": 0.01, "perf/fwd_bwd_s": 0.08, "perf/optim_s": 0.01, **extra}


LOAD = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
SEQ = {1: 128, 2: 256, 3: 32, 4: 64, 5: 256, 6: 128, 7: 32, 8: 256}


def full_run() -> list[dict]:
    """Decomposition steps, a growth event at step 4, MoE loads, evals at 4 and 8 (new names)."""
    recs = []
    for s in range(1, 9):
        k = SEQ[s].bit_length() - 1
        recs.append({"step": s, "time": s - 0.5, "data/bucket": k, "data/seq_len": SEQ[s],
                     "data/batch_size": T // SEQ[s], "data/sp": 1, "data/attn_flops": 1e5, "data/step_s": 0.1})
        load = LOAD if s < 8 else [row[::-1] for row in LOAD]  # the heatmap shows the last window's
        recs.append(train_rec(s, **{"moe/expert_load": load, "moe/balance_min": 0.6, "growth/stage": int(s > 4)}))
        if s == 4:
            recs.append({"step": 4, "time": 4.2, "growth/event": "grow:stack", "growth/stage": 1,
                         "growth/params_small": 1000, "growth/params_large": 4000})
        if s % 4 == 0:
            recs.append({"step": s, "time": s + 0.1, "train/tokens": T * s, "eval/loss": 6.2 - 0.1 * s,
                         "eval/ppl": float(np.exp(6.2 - 0.1 * s))})
    return recs


def old_run() -> list[dict]:
    """A run directory of the pre-catalogue era: flat names, MFU a fraction, evals without tokens,
    logged every 2 steps (an eval at step 3 falls between records) and a torn last line."""
    recs = [train_rec(s, new=False) for s in (2, 4, 6)]
    recs.insert(2, {"step": 3, "time": 3.5, "eval/loss": 5.9, "eval/ppl": 365.0})
    recs.append({"step": 6, "time": 6.1, "eval/loss": 5.6, "eval/ppl": 270.4})
    return recs


def write_run(path, recs, torn: bool = False):
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (path / "metrics.jsonl").write_text(text + ('{"step": 7, "train/lo' if torn else ""))
    return path


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / "full", full_run()), write_run(tmp_path / "old", old_run(), torn=True)


def lines(ax, gid):
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid]


def test_sparkline_spans_the_whole_run():
    from kiln.trainer.report import BARS, sparkline

    short = sparkline([15.0 - i for i in range(15)])  # the default run's 15 records: 15 bars
    assert len(short) == 15 and short[0] == BARS[-1] and short[-1] == BARS[0]
    long = sparkline([float(i) for i in range(600)], width=60)
    assert len(long) == 60 and long[0] == BARS[0] and long[-1] == BARS[-1]


def test_figures_hold_each_runs_lines_and_data(runs):
    from kiln.trainer.report import load_run
    from kiln.trainer.report_plots import figures

    full, old = runs
    figs = figures([("full", load_run(full)), ("old", load_run(old))])
    assert list(figs) == ["loss", "throughput", "expert_load", "buckets"]
    ax = figs["loss"].axes[0]
    # runs x (train, eval), one growth marker; nothing else drawn on the loss axes
    assert len(lines(ax, "train")) == 2 and len(lines(ax, "eval")) == 2 and len(lines(ax, "growth")) == 1
    assert len(ax.get_lines()) == 5
    train_full, train_old = lines(ax, "train")
    np.testing.assert_allclose(train_full.get_xdata(), [T * s for s in range(1, 9)])
    np.testing.assert_allclose(train_full.get_ydata(), [6.0 - 0.1 * s for s in range(1, 9)])
    np.testing.assert_allclose(train_old.get_xdata(), [2 * T, 4 * T, 6 * T])
    # old evals have no tokens: placed by step between the train records (step 3 -> 3 T)
    np.testing.assert_allclose(lines(ax, "eval")[1].get_xdata(), [3 * T, 6 * T])
    assert lines(ax, "growth")[0].get_xdata()[0] == 4 * T
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "full train", "full eval", "full grow:stack", "old train", "old eval"]
    lr, tok_s, mfu = figs["throughput"].axes
    assert [len(lines(a, k)) for a, k in ((lr, "train/lr"), (tok_s, "perf/tokens_per_s"), (mfu, "perf/mfu_pct"))] \
        == [2, 2, 2]
    # the old run's MFU was a fraction: drawn in percent like the new one's
    np.testing.assert_allclose(lines(mfu, "perf/mfu_pct")[1].get_ydata(), [100 * (0.02 + 0.001 * s) for s in (2, 4, 6)])
    heat = figs["expert_load"].axes[0]  # one heatmap: only one run has MoE (the other axes is its colorbar)
    assert len(figs["expert_load"].axes) == 2 and "full" in heat.get_title() and "step 8" in heat.get_title()
    np.testing.assert_allclose(heat.get_images()[0].get_array(), [row[::-1] for row in LOAD])
    (seq,) = lines(figs["buckets"].axes[0], "seq_len")
    assert list(seq.get_ydata()) == [SEQ[s] for s in range(1, 9)] and list(seq.get_xdata()) == list(range(1, 9))


def test_plots_without_data_are_left_out(runs):
    from kiln.trainer.report import load_run
    from kiln.trainer.report_plots import figures

    assert list(figures([("old", load_run(runs[1]))])) == ["loss", "throughput"]
    assert list(figures([("evals", [{"step": 4, "time": 1.0, "eval/loss": 5.0, "eval/ppl": 148.4}])])) == ["loss"]
    bare = [{"step": 1, "time": 1.0, "train/loss": 5.0, "train/tokens": 8}]  # no lr, tokens/s or MFU logged
    assert list(figures([("bare", bare)])) == ["loss"]


def colour_fraction(img, colour: str) -> float:
    """Share of the image's pixels within a small distance of a matplotlib colour."""
    rgb = np.asarray(colors.to_rgb(colour))
    return float((np.abs(img[..., :3] - rgb).max(axis=-1) < 0.08).mean())


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def check_page(out, names) -> None:
    """Every <img> of out/report.html is a data: URI of a valid PNG, byte-equal to out/<name>.png."""
    parser = Images()
    parser.feed((out / "report.html").read_text())
    assert len(parser.srcs) == len(names)
    for src, name in zip(parser.srcs, names):
        head, _, b64 = src.partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(b64, validate=True)
        assert png.startswith(PNG_MAGIC) and png == (out / f"{name}.png").read_bytes()


def test_cli_writes_valid_non_blank_pngs_and_a_self_contained_page(runs, tmp_path, capsys):
    full, old = runs
    out = tmp_path / "out"
    assert main(["report", str(full), "--compare", str(old), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"run {full}: 8 train records, 2 evaluations" in printed and f"run {old}: 3 train records" in printed
    names = ["loss", "throughput", "expert_load", "buckets"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in names] + ["report.html"])
    assert str(out / "report.html") in printed
    for name in names:
        img = mpimg.imread(out / f"{name}.png")
        assert img.shape[0] >= 300 and img.shape[1] == 800, (name, img.shape)
        background = (img[..., :3] > 0.98).all(axis=-1).mean()
        assert img[..., :3].std() > 0.05 and 0.01 < 1 - background, name  # not blank (what is drawn: below)
    # each run's colour is on the plots that draw both runs; the heatmap is in colour
    for name in ("loss", "throughput"):
        img = mpimg.imread(out / f"{name}.png")
        assert colour_fraction(img, "C0") > 0.001 and colour_fraction(img, "C1") > 0.001, name
    assert colour_fraction(mpimg.imread(out / "buckets.png"), "C0") > 0.001  # only the full run has buckets
    img = mpimg.imread(out / "expert_load.png")[..., :3]
    assert (img.max(axis=-1) - img.min(axis=-1) > 0.3).mean() > 0.2  # a quarter-plus of saturated pixels
    check_page(out, names)
    assert "grow:stack" not in (out / "report.html").read_text()  # the legend is in the image, not the page
    assert f"run {old}: 3 train records" in (out / "report.html").read_text()  # the tables are


def test_text_table_of_an_old_run_and_no_files_without_out(runs, tmp_path, capsys):
    old = runs[1]
    assert main(["report", str(old)]) == 0
    text = capsys.readouterr().out
    assert f"run {old}: 3 train records, 2 evaluations" in text
    assert "      4   5.6000  1.00e-03     1,040   2.4%    0.40" in text  # MFU 0.024 as a percent
    assert "eval at step 6: loss 5.6000, ppl 270.40" in text
    assert sorted(p.name for p in old.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("case, fragment", [
    ("no_metrics", "no metrics.jsonl in"),
    ("empty", "holds no records"),
    ("compare_not_run", "--compare"),
    ("out_is_file", "is a file"),
    ("missing", "is not a folder"),
])
def test_bad_input_is_one_line(runs, tmp_path, capsys, case, fragment):
    full = runs[0]
    (tmp_path / "bare").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    argv = {"no_metrics": [tmp_path / "bare"], "empty": [tmp_path / "empty"],
            "compare_not_run": [full, "--compare", tmp_path / "bare"],
            "out_is_file": [full, "--out", tmp_path / "a_file"], "missing": [tmp_path / "nowhere"]}[case]
    assert main(["report", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: error: ") and fragment in err[0], err
    assert (tmp_path / "a_file").read_text() == "x"

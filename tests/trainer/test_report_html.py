"""`kiln report --compare --out` on real runs, and its page rendered by headless Chromium.

One tiny `kiln train` run for the module, with every optional plot's data (dataset decomposition,
G_stack growth halfway, an expert-parallel MoE), compared with a run directory of the pre-catalogue
era built by hand (old metric names; a second real run would double the module's time).
Chromium is Debian's package, installed by tests/trainer/chromium.py when missing (about a minute,
once); where it cannot be installed the Chromium test skips and says why.
"""
import re

import pytest

from tests.trainer import chromium
from tests.trainer.conftest import SMALL, kiln
from tests.trainer.test_report import check_page, old_run, write_run

pytestmark = pytest.mark.slow

EVERYTHING = ["--set", "data.packing=decompose", "--set", "data.buckets=[5, 8]", "--set", "data.num_cycles=2",
              "--set", "train.tokens_per_step=1024", "--set", "model.n_layers=4", "--set", "growth.op=stack",
              "--set", "growth.factor=2", "--set", "growth.at_tokens=0.5", "--set", "model.mlp=moe",
              "--set", "model.moe.num_experts=4", "--set", "model.moe.top_k=2", "--set", "parallel.ep=2"]
PLOTS = ["loss", "throughput", "expert_load", "buckets"]

# Appended to a copy of the page: after load, how many images decoded (naturalWidth > 0)
CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
  const d = document.createElement("div");
  d.id = "kiln-check";
  d.textContent = `loaded=${ok.length} total=${imgs.length} widths=${ok.map(i => i.naturalWidth).join(",")}`;
  document.body.appendChild(d);
});
</script>
"""


@pytest.fixture(scope="module")
def report(kiln_home, tmp_path_factory):
    """(run dirs, output folder, the CLI's stdout) of `kiln report grown --compare old --out`."""
    home = tmp_path_factory.mktemp("report")
    recipe = home / "small.yaml"
    recipe.write_text(SMALL.replace("CACHE", str(kiln_home / "cache")).replace("RUNS", str(home / "runs")))
    kiln("train", recipe, *EVERYTHING, "--set", "train.steps=10", "--set", "train.eval_every=4",
         "--set", "checkpoint.every=100", "--set", "train.name=grown")
    runs = home / "runs" / "grown", write_run(home / "runs" / "old", old_run(), torn=True)
    out = home / "out"
    res = kiln("report", runs[0], "--compare", runs[1], "--out", out)
    return runs, out, res.stdout


def test_real_runs_give_every_plot_with_the_right_lines(report):
    from kiln.trainer.report import load_run
    from kiln.trainer.report_plots import figures

    (grown, old), out, stdout = report
    assert f"4 plots ({', '.join(p + '.png' for p in PLOTS)}) and {out / 'report.html'}" in stdout
    check_page(out, PLOTS)
    recs = load_run(grown)
    assert [r["growth/event"] for r in recs if "growth/event" in r] == ["grow:stack"]
    figs = figures([("grown", recs), ("old", load_run(old))])
    assert list(figs) == PLOTS
    loss_ax = figs["loss"].axes[0]
    gids = sorted(str(ln.get_gid()) for ln in loss_ax.get_lines())
    assert gids == ["eval", "eval", "growth", "train", "train"]  # 2 runs x (train, eval) + the growth marker
    train = [ln for ln in loss_ax.get_lines() if ln.get_gid() == "train"]
    assert [len(ln.get_xdata()) for ln in train] == [10, 3]  # every train record (train.log_every=1)
    growth = next(ln for ln in loss_ax.get_lines() if ln.get_gid() == "growth").get_xdata()[0]
    event = next(r for r in recs if "growth/event" in r)
    assert growth == next(r["train/tokens"] for r in recs if "train/loss" in r and r["step"] == event["step"])
    steps = [r for r in recs if "data/seq_len" in r]
    (seq,) = figs["buckets"].axes[0].get_lines()
    assert list(seq.get_ydata()) == [r["data/seq_len"] for r in steps] and len(steps) == 10
    heat = figs["expert_load"].axes[0].get_images()[0].get_array()
    assert heat.shape == (4, 4)  # the grown model's 4 layers x 4 experts; each layer's shares sum to 1
    assert abs(heat.sum(axis=1) - 1).max() < 1e-3


def test_page_renders_in_chromium_with_every_image_loaded(report, tmp_path):
    _, out, _ = report
    try:
        browser = chromium.ensure(log=tmp_path / "apt.log")
    except chromium.Unavailable as e:
        print(f"\nskip: {e}")
        pytest.skip(str(e))
    page = (out / "report.html").read_text()
    good, broken = tmp_path / "good.html", tmp_path / "broken.html"
    good.write_text(page.replace("</body>", CHECK + "</body>"))
    # the check itself can fail: one image's data cut short does not load
    first = page.index("base64,") + len("base64,")
    broken.write_text((page[:first] + "AAAA" + page[first + 4000:]).replace("</body>", CHECK + "</body>"))
    seen = {}
    for name, path in (("good", good), ("broken", broken)):
        m = re.search(r'id="kiln-check">loaded=(\d+) total=(\d+) widths=([\d,]*)<',
                      chromium.dump_dom(browser, path, tmp_path / "profile"))
        assert m, f"the page's check script did not run in Chromium ({name})"
        seen[name] = int(m[1]), int(m[2]), m[3]
    assert seen["good"] == (4, 4, "800,800,800,800")
    assert seen["broken"][:2] == (3, 4)

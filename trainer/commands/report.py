"""`kiln report RUN_DIR [--compare RUN_DIR ...] [--out DIR]`: a run's metrics as text, or as PNG
plots and one self-contained HTML page (docs/report.md)."""
from pathlib import Path

from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln report`'s arguments."""
    r = sub.add_parser("report", help="summarise a run directory's metrics (text, or plots and HTML with --out)",
                       description="Print a run's metrics as a table; with --out, also write PNG plots and "
                                   "DIR/report.html.")
    r.add_argument("run_dir", help="e.g. runs/tiny")
    r.add_argument("--compare", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                   help="more run directories drawn on the same axes (repeatable)")
    r.add_argument("--out", metavar="DIR", help="write DIR/*.png and DIR/report.html (created if needed)")


def run_names(dirs: list[Path]) -> list[str]:
    """Legend names: the folder names, or the paths where two runs share a folder name."""
    names = [d.name or str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def metrics_file(run_dir: Path) -> str:
    """The run's logging.metrics_file from its saved recipe (metrics.jsonl by default)."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
        return str(recipe.get("logging", {}).get("metrics_file") or "metrics.jsonl")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return "metrics.jsonl"


def out_dir(path: str) -> Path:
    """--out as a folder to write to, created if missing; one line if it cannot be."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the plots and report.html")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".kiln-write-check").touch()
        (out / ".kiln-write-check").unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} is not a writable folder ({e.strerror or e}): give another") from None
    return out


def run(args) -> int:
    """Print the tables; with --out, also the plots and the page, and say where they are."""
    from kiln.trainer.report import load_run, table

    dirs = [Path(args.run_dir)] + [Path(d) for d in args.compare]
    for d in dirs[1:]:
        if not (d / metrics_file(d)).is_file():
            raise ConfigError(f"--compare {d} is not a run directory (no {metrics_file(d)} in it): give "
                              f"runs/<name> folders")
    out = out_dir(args.out) if args.out else None  # before the work: a bad --out fails fast
    runs = [(name, d, load_run(d, metrics_file(d))) for name, d in zip(run_names(dirs), dirs)]
    tables = [table(d, recs) for _, d, recs in runs]
    print("\n\n".join(tables))
    if out is None:
        return 0
    from kiln.trainer import report_html, report_plots

    figs = report_plots.figures([(name, recs) for name, _, recs in runs])
    pngs = report_plots.save(figs, out)
    plots = [(name, report_plots.CAPTIONS[name], png) for name, png in pngs.items()]
    title = "kiln report: " + ", ".join(name for name, _, _ in runs)
    (out / "report.html").write_text(report_html.page(title, plots, tables))
    print(f"\nkiln: {len(pngs)} plots ({', '.join(f'{n}.png' for n in pngs)}) and {out / 'report.html'}")
    return 0

"""`kiln report --out DIR`'s page: one self-contained report.html, its plots embedded as base64
PNG data URIs (the file can be mailed or opened anywhere, no folder of images beside it) and the
terminal's text tables below them."""
import base64
import html


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI an <img> can load."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, plots: list[tuple[str, str, bytes]], tables: list[str]) -> str:
    """The HTML of the report: (name, caption, PNG bytes) per plot, then the text tables."""
    figs = "\n".join(
        f'<figure id="{html.escape(name)}">\n<img src="{data_uri(png)}" alt="{html.escape(name)}">\n'
        f"<figcaption>{html.escape(caption)}</figcaption>\n</figure>"
        for name, caption, png in plots)
    pres = "\n".join(f"<pre>{html.escape(t)}</pre>" for t in tables)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 62em; margin: 2em auto; padding: 0 1em; color: #222; }}
figure {{ margin: 1.5em 0; }}
img {{ max-width: 100%; height: auto; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{figs or "<p>No plottable metrics.</p>"}
<h2>Tables</h2>
{pres}
</body>
</html>
"""

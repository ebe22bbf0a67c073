"""DVC's plots offline: the HTML template `dvc plots show` fills, with the vega libraries inlined, and PNG
renders of every plot made without a browser.

    python scripts/plots.py template                  # .dvc/offline-plots.html (make venv does this)
    python scripts/plots.py figures --out docs/figures  # dvc plots show --json, each plot to a PNG

DVC's own page loads vega, vega-lite and vega-embed from a CDN and is blank offline. vl-convert-python
ships them (with a JavaScript engine that renders without a browser), so both come from one pinned package.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import vl_convert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moder.io import atomic_path  # noqa: E402

TEMPLATE = Path(".dvc/offline-plots.html")  # .dvc/config: plots.html_template (relative to .dvc/)
# DVC's page with its {scripts} placeholder left out (that is where it puts the CDN <script> tags): each
# plot's inline script calls vegaEmbed, which the bundle defines first.
PAGE = """<!DOCTYPE html>
<html>
<head>
  {refresh_tag}
  <meta charset="utf-8">
  <title>DVC plots (offline)</title>
  <script>BUNDLE</script>
  <style>body { font-family: sans-serif; } div { margin: 12px; }</style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    bundle = vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed;")
    # the bundle is read inside a <script> element: a literal closing tag in it would end the element
    return PAGE.replace("BUNDLE", bundle.replace("</script", "<\\/script"))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def write_figures(show: dict, out: Path) -> list[Path]:
    """Every vega plot of `dvc plots show --json` output as <out>/<slug of its name>.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, renders in show.get("data", {}).items():
        for render in renders:
            if render.get("type") != "vega":
                continue
            path = out / f"{slug(Path(name).stem if name.endswith(('.csv', '.json')) else name)}.png"
            png = vl_convert.vegalite_to_png(render["content"], scale=2)
            with atomic_path(path) as temporary:
                temporary.write_bytes(png)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    template = commands.add_parser("template", help="write the offline HTML template")
    template.add_argument("--out", type=Path, default=TEMPLATE)
    figures = commands.add_parser("figures", help="render every plot to PNG")
    figures.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    if args.command == "template":
        with atomic_path(args.out) as temporary:
            temporary.write_text(offline_template())
        print(f"wrote {args.out}")
        return
    done = subprocess.run(["dvc", "plots", "show", "--json"], text=True, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"error: dvc plots show --json failed: {done.stderr.strip().splitlines()[-1:]}")
    for path in write_figures(json.loads(done.stdout), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

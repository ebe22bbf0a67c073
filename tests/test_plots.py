"""scripts/plots.py: `dvc plots show` offline, and PNG renders without a browser."""

import importlib.util
import re
import subprocess
import sys

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("plots", REPO / "scripts" / "plots.py")
plots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plots)

NETWORK = re.compile(r"""<(?:script|link|img)[^>]*(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def test_dvc_plots_show_with_the_offline_template_loads_nothing_from_the_network(tmp_path):
    template = tmp_path / "offline.html"
    template.write_text(plots.offline_template())
    out = tmp_path / "plots"
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), "-o", str(out)],
        cwd=REPO,
        text=True,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    page = (out / "index.html").read_text()
    assert not NETWORK.search(page) and "cdn.jsdelivr" not in page
    assert "window.vegaEmbed" in page  # the bundle defines what each plot's script calls
    # every plot of dvc.yaml drawn: six plots, each one vegaEmbed call
    assert len(re.findall(r"vegaEmbed\('#", page)) == 6
    # DVC uses the committed setting when no --html-template is given
    assert "html_template = offline-plots.html" in (REPO / ".dvc" / "config").read_text()


def test_figures_are_png_renders_named_after_their_plots(tmp_path):
    content = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": [{"step": "1. a", "accuracy": 40.0}, {"step": "2. b", "accuracy": 50.0}]},
        "mark": "line",
        "encoding": {"x": {"field": "step", "type": "ordinal"}, "y": {"field": "accuracy", "type": "quantitative"}},
    }
    show = {"data": {"reports/seen.csv": [{"type": "vega", "content": content}], "x.png": [{"type": "image"}]}}
    written = plots.write_figures(show, tmp_path / "figures")
    assert written == [tmp_path / "figures" / "seen.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`report --figures`: a report's charts drawn by matplotlib as PNG, SVG or PDF, linked from the Markdown report."""

import os
import xml.etree.ElementTree as ET

import pytest

from conftest import run_cli
from hybridctl.core.lab.charts import Chart, Series
from hybridctl.core.lab.figures import save_figure


def test_png_with_min_max_error_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    chart = Chart("loss_vs_attention", "loss vs attention", "attention layers (%)", "best_val_loss",
                  [Series("mean", [0, 50], [5.0, 4.8]), Series("min", [0, 50], [4.9, 4.7]),
                   Series("max", [0, 50], [5.1, 4.95])], points=True)
    path = save_figure(chart, tmp_path, "png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0


def test_report_writes_svg_figures_linked_from_the_markdown(finished_micro_run, tmp_path):
    pytest.importorskip("matplotlib")
    md = tmp_path / "r.md"
    result = run_cli("report", str(finished_micro_run), "--out", str(md), "--figures", "svg")
    assert result.returncode == 0, result.stderr
    svgs = sorted((tmp_path / "r_plots").glob("*.svg"))
    assert svgs
    for svg in svgs:
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg")
        assert f"[svg](r_plots/{svg.name})" in md.read_text()
    text = svgs[0].read_text()
    assert "step" in text  # the x axis is labelled


def test_missing_matplotlib_or_bad_format_is_one_line_and_writes_nothing(finished_micro_run, tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    md = tmp_path / "r.md"
    result = run_cli("report", str(finished_micro_run), "--out", str(md), "--figures", "png", env=env)
    assert result.returncode != 0
    assert result.stderr == 'error: --figures needs matplotlib, which is not installed; run pip install "hybridctl[figures]"\n'
    bad = run_cli("report", str(finished_micro_run), "--out", str(md), "--figures", "jpg")
    assert bad.returncode != 0 and bad.stderr.startswith("error: --figures jpg is not an image format")
    assert not md.exists() and not (tmp_path / "r_plots").exists()

"""Charts drawn through the installed plotext (5.x or 6.x): text, colours, log axes and the saved files."""

import html
import math
import re

from hybridctl.core.lab.charts import Chart, Series
from hybridctl.core.lab.plots import render_chart, save_chart

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def two_runs(**kw) -> Chart:
    return Chart("val_loss_vs_steps", "validation loss vs steps", "step", "validation loss",
                 [Series("run_alpha", [1, 2, 3, 4], [4.0, 3.5, 3.2, 3.1]),
                  Series("run_beta", [1, 2, 3, 4], [4.1, 3.9, 3.8, 3.7])], **kw)


def lr_chart(xticks=True) -> Chart:
    xs = [1e-4, 1e-3, 1e-2]
    return Chart("loss_vs_lr", "loss vs learning rate", "learning rate", "loss", [Series("loss", xs, [5.6, 5.3, 5.9])],
                 xlog=True, points=True, xticks=[(x, f"{x:.0e}") for x in xs] if xticks else [])


def test_save_chart_writes_text_and_html_with_the_series(tmp_path):
    txt, html_file = save_chart(two_runs(), tmp_path / "plots", width=80)
    assert (txt.name, html_file.name) == ("val_loss_vs_steps.txt", "val_loss_vs_steps.html")
    text = txt.read_text()
    lines = text.rstrip("\n").splitlines()
    assert len(lines) == 20 and max(len(line) for line in lines) <= 80  # chart_size(80)
    assert "validation loss vs steps" in lines[0] and "run_alpha" in text and "run_beta" in text
    assert "4.10" in text and "3.10" in text and "┤" in text and not ANSI.search(text)
    page = html_file.read_text()
    assert "<" in page and "color" in page  # coloured markup, not plain text
    shown = html.unescape(re.sub(r"<[^>]+>", "", page)).replace("\xa0", " ")
    assert "validation loss vs steps" in shown and "run_alpha" in shown and "run_beta" in shown


def test_series_keep_one_colour_each_and_plain_markers_without_colour():
    coloured = render_chart(two_runs(points=True), width=70, height=16)
    # one colour per series, shared by its line and its points; nothing else coloured (readable on any background)
    assert len(set(re.findall(r"\x1b\[38;5;(\d+)m", coloured))) == 2 and "\x1b[48" not in coloured
    shown = ANSI.sub("", coloured)
    assert "run_alpha" in shown and "braille" not in shown  # the legend shows a sample of each line, not its name
    plain = render_chart(two_runs(), width=70, height=16, color=False)
    assert not ANSI.search(plain) and "• run_alpha" in plain and "x run_beta" in plain


def test_log_axis_with_given_ticks_draws_every_point():
    plain = render_chart(lr_chart(), width=60, height=14, color=False)
    assert plain.count("●") == 3  # one mark per point, all inside the frame
    assert all(label in plain for label in ("1e-04", "1e-03", "1e-02"))
    axis = next(line for line in plain.splitlines() if "└" in line)
    marks = [i for i, c in enumerate(axis) if c == "┬"]
    # evenly spaced: each tick a factor of ten from the last
    assert len(marks) == 3 and abs((marks[1] - marks[0]) - (marks[2] - marks[1])) <= 1


def test_log_axis_without_ticks_labels_powers_of_ten():
    plain = render_chart(lr_chart(xticks=False), width=60, height=14, color=False)
    assert plain.count("●") == 3 and all(label in plain for label in ("0.0001", "0.001", "0.01"))


def test_size_is_the_one_asked_whatever_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("LINES", "10")
    lines = render_chart(two_runs(), width=100, height=22, color=False).splitlines()
    assert len(lines) == 22 and max(len(line) for line in lines) == 100


def test_unplottable_values_are_left_out():
    chart = Chart("c", "one point left", "x", "y", [Series("s", [1, 2, math.nan, 3], [2.0, math.inf, 1.0, None])])
    plain = render_chart(chart, width=50, height=12, color=False)
    assert plain.count("●") == 1 and "one point left" in plain
    assert Chart("e", "empty", "x", "y", [Series("s", [], [])]).is_empty()

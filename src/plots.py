"""The summary figures, drawn with matplotlib's object API and saved as PNG.

Each function takes plain values (points, series), so the reports decide what is drawn and
these only decide how.  Sizes are in KB (src.units) on a log axis: one large model must not
squash every other point onto the axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

DPI = 100


@dataclass
class Point:
    """One run or trial on an accuracy-vs-size plot."""

    label: str  # trial number or job, written next to the point
    size_kb: float
    accuracy: float
    group: str = ""  # one colour per group (the pruning method), if any


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Returns the points no other point beats on both size (down) and accuracy (up), by size."""
    ordered = sorted((p for p in points if plottable(p)), key=lambda p: (p.size_kb, -p.accuracy))
    front: list[Point] = []
    for point in ordered:
        if not front or point.accuracy > front[-1].accuracy:
            front.append(point)
    return front


def plottable(point: Point) -> bool:
    """Returns whether the point has a positive size and an accuracy to draw."""
    return math.isfinite(point.size_kb) and math.isfinite(point.accuracy) and point.size_kb > 0


def accuracy_vs_size(points: Sequence[Point], title: str, path: Path,
                     size_name: str = "zipped .tflite size", unit: str = "KB",
                     best: tuple[str, str] | None = None) -> Path:
    """Writes accuracy against size (KB, log axis), the front connected, points labelled.

    Any cost to minimise works as the x axis (latency in ms, MACs in millions): name its unit.
    best: (a point's label, what it is best at) is starred, e.g. a study's best trial.
    """
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    shown = [p for p in points if plottable(p)]
    groups = sorted({p.group for p in shown})
    front = pareto_front(shown)
    for index, group in enumerate(groups):
        members = [p for p in shown if p.group == group]
        colour = f"C{index}" if group else "0.55"
        axes.scatter([p.size_kb for p in members], [p.accuracy for p in members], s=30,
                     color=colour, label=group or "trials", zorder=3)
    axes.plot([p.size_kb for p in front], [p.accuracy for p in front], "-", color="black",
              lw=1.2, alpha=0.7, zorder=2, label=f"Pareto front ({len(front)})")
    axes.scatter([p.size_kb for p in front], [p.accuracy for p in front], s=90,
                 facecolors="none", edgecolors="black", zorder=4)
    for point in shown:
        axes.annotate(point.label, (point.size_kb, point.accuracy), xytext=(4, 4),
                      textcoords="offset points", fontsize=8)
    starred = [p for p in shown if best and p.label == best[0]]
    if starred:
        axes.scatter([starred[0].size_kb], [starred[0].accuracy], s=260, marker="*",
                     color="gold", edgecolors="black", zorder=5, label=f"{best[0]}: {best[1]}")
    axes.set_xscale("log")
    _label_log_axis(axes, [p.size_kb for p in shown])
    axes.set(xlabel=f"{size_name} ({unit}, log scale)", ylabel="TFLite test accuracy",
             title=title)
    axes.grid(alpha=0.3, which="both")
    _legend(axes)
    return _save(figure, path)


def _label_log_axis(axes, values: Sequence[float]) -> None:
    """Writes plain numbers on a log x axis, minor ticks too when it spans few decades.

    Without them, sizes from 9 to 13 KB would show a single '10'.
    """
    decades = math.log10(max(values) / min(values)) if values else 3.0
    if decades < 1:  # within one decade the log ticks miss most values: space them evenly
        axes.xaxis.set_major_locator(MaxNLocator(nbins=6))
    labelled = (2, 5) if 1 <= decades < 2 else ()

    def minor(value: float, _) -> str:
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if leading in labelled else ""

    axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes.xaxis.set_minor_formatter(FuncFormatter(minor))
    axes.tick_params(axis="x", which="minor", labelsize=8)


def accuracy_vs_rate(series: dict[str, list[tuple[float, float, float]]], dense: float | None,
                     title: str, path: Path) -> Path:
    """Writes Keras and TFLite accuracy against pruning rate, one colour per method.

    series maps a method to its (rate, keras accuracy, tflite accuracy) points; dense is the
    dense baseline's accuracy, drawn as a horizontal line.
    """
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for index, (method, points) in enumerate(sorted(series.items())):
        points = sorted(points)
        rates = [p[0] for p in points]
        axes.plot(rates, [p[1] for p in points], "o-", color=f"C{index}",
                  label=f"{method} (Keras)")
        axes.plot(rates, [p[2] for p in points], "x--", color=f"C{index}",
                  label=f"{method} (TFLite)")
    if dense is not None and math.isfinite(dense):
        axes.axhline(dense, color="0.3", ls=":", label=f"dense baseline (Keras) {dense:.1%}")
    channels = "channel" in series  # its rate removes channels, not single weights
    axes.set(xlabel="prune.rate (fraction of prunable weights removed"
                    + (", of channels for channel)" if channels else ")"),
             ylabel="test accuracy", title=title)
    axes.grid(alpha=0.3)
    _legend(axes)
    return _save(figure, path)


def history(series: dict[str, tuple[list[int], list[float], bool]], title: str,
            path: Path, stopped: Sequence[int] = ()) -> Path:
    """Writes one panel per objective: each trial's value and the best so far.

    series maps an objective's label to (trial numbers, values, maximize); stopped numbers
    the trials stopped early (no final value), marked along the bottom.
    """
    figure = Figure(figsize=(7, 2.2 + 2.3 * len(series)))
    panels = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (name, (numbers, values, maximize)) in zip(panels, series.items()):
        best, running = [], None
        for value in values:
            running = value if running is None else (max if maximize else min)(running, value)
            best.append(running)
        axes.scatter(numbers, values, s=25, color="C0", label="trial", zorder=3)
        axes.step(numbers, best, where="post", color="C3",
                  label="best so far (" + ("max" if maximize else "min") + ")")
        if stopped:  # no value to place: x marks on the axis, at their trial numbers
            axes.scatter(stopped, [0.03] * len(stopped), marker="x", s=30, color="0.45",
                         transform=axes.get_xaxis_transform(), clip_on=False,
                         label="stopped early (no final value)")
            every = [*numbers, *stopped]
            axes.set_xlim(min(every) - 0.4, max(every) + 0.4)
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        _legend(axes)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    panels[0].set_title(title)
    panels[-1].set_xlabel("trial number")
    figure.tight_layout()
    return _save(figure, path)


def importances(series: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """Writes one horizontal bar chart per objective of each parameter's importance."""
    figure = Figure(figsize=(7, 1.5 + 0.4 * sum(len(v) + 1 for v in series.values())))
    panels = figure.subplots(len(series), 1, squeeze=False)[:, 0]
    for axes, (name, values) in zip(panels, series.items()):
        names = list(values)[::-1]  # most important on top
        bars = axes.barh(names, [values[n] for n in names], color="C0")
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
        axes.set(xlabel=f"importance for {name}", xlim=(0, 1.1))
    panels[0].set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def sizes(labels: Sequence[str], values_kb: Sequence[float], title: str, path: Path) -> Path:
    """Writes a bar chart of file sizes in KB, each bar labelled with its value."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bars = axes.bar(labels, values_kb, color=["#888", "#aaa", "#37c", "#6ae"][: len(labels)])
    axes.bar_label(bars, fmt="%.1f KB", fontsize=8)
    axes.set(ylabel="KB", title=title)
    axes.margins(y=0.15)
    return _save(figure, path)


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:  # a sweep whose jobs all failed has nothing to list
        axes.legend(fontsize=8, loc="best")


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return path

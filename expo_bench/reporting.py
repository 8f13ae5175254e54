"""Tables in the two forms every task writes: Markdown files and rich terminal tables."""

from __future__ import annotations

import hashlib
import math
import textwrap
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

from rich import box
from rich.cells import cell_len
from rich.console import Console, OverflowMethod
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

Done = Callable[[int], None]
"""Told how many of a long phase's items are done so far."""

SEPARATION = 3
"""Terminal columns each table column takes besides its text: a space either side, and the divider before the next."""


Z_95 = 1.959963984540054
"""The standard normal's 97.5% quantile: a 95% interval over the prompts of one run is ± Z_95 standard errors."""


METHOD_STYLES = {
    "sft-reference": ("#7f7f7f", "o", ":"),
    "dpo": ("#1f77b4", "s", "-"),
    "ipo": ("#ff7f0e", "D", "--"),
    "simpo": ("#2ca02c", "^", "-."),
    "expo_compositional": ("#d62728", "o", "-"),
    "expo_regression": ("#9467bd", "v", "--"),
    "fdpo_js": ("#8c564b", "P", "-."),
    "dpo_kl": ("#e377c2", "X", ":"),
    "rpo": ("#bcbd22", "*", "-"),
}
"""The built-in methods' colour, marker and line style: the same in every plot of every experiment."""
OTHER_STYLES = (
    ("#17becf", "<", "--"),
    ("#393b79", ">", "-."),
    ("#637939", "p", ":"),
    ("#8c6d31", "h", "-"),
    ("#843c39", "d", "--"),
    ("#7b4173", "H", "-."),
    ("#31a354", "8", ":"),
    ("#756bb1", "x", "-"),
)
"""Other labels (``dpo-margin``, your own methods) take one of these by a hash of the label: stable everywhere."""


def method_style(method: str) -> dict[str, str]:
    """Matplotlib's ``color``, ``marker`` and ``linestyle`` of a method or a recipe's label for one."""
    found = METHOD_STYLES.get(method)
    if found is None:
        found = OTHER_STYLES[int(hashlib.sha256(method.encode()).hexdigest(), 16) % len(OTHER_STYLES)]
    colour, marker, linestyle = found
    return {"color": colour, "marker": marker, "linestyle": linestyle}


def with_interval(mean: float, half_width: float | None = None) -> str:
    """``0.740 ± 0.090``: the mean to the interval's two significant digits; the mean alone (4 significant digits)
    without an interval, ``n/a`` where the value is undefined."""
    if not math.isfinite(mean):
        return "n/a"
    if not half_width or not math.isfinite(half_width):
        return f"{mean:.4g}"
    decimals = min(6, max(0, 1 - math.floor(math.log10(half_width))))
    return f"{mean:.{decimals}f} ± {half_width:.{decimals}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def column_width(title: str, cells: Sequence[str]) -> int:
    """Wide enough for every cell on one line and the title on at most two (it wraps between its words)."""
    width = max([cell_len(cell) for cell in cells] + [cell_len(word) for word in title.split()] + [1])
    while len(textwrap.wrap(title, width)) > 2:
        width += 1
    return width


def rich_table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int | None = None,
    elsewhere: str = "the file",
    required: int = 1,
    wrap: Collection[int] = (),
) -> Table:
    """A terminal table within ``width`` terminal columns (every column without a width): the first ``required``
    columns always, then, in order, each other column that still fits; the caption names those left out, which
    ``elsewhere`` holds. Cells never wrap or fold, except in the ``wrap`` columns (among the required), which wrap
    between their words, the widest first, where the required columns would not fit otherwise."""
    widths = [column_width(name, [row[index] for row in rows]) for index, name in enumerate(header)]
    kept = list(range(min(required, len(header))))
    used = -1 + sum(widths[index] + SEPARATION for index in kept)  # the last column has no divider after it
    narrowest = {
        index: max(cell_len(word) for text in [header[index], *(row[index] for row in rows)] for word in text.split() or [""])
        for index in wrap
        if index in kept
    }
    while width is not None and used > width:
        shrinkable = [index for index, least in narrowest.items() if widths[index] > least]
        if not shrinkable:
            break
        widths[max(shrinkable, key=widths.__getitem__)] -= 1
        used -= 1
    for index in range(len(kept), len(header)):
        if width is None or used + widths[index] + SEPARATION <= width:
            kept.append(index)
            used += widths[index] + SEPARATION
    left_out = [name for index, name in enumerate(header) if index not in kept]
    caption = f"Also in {elsewhere}: {', '.join(left_out)}." if left_out else None
    table = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1))
    for index in kept:
        overflow: OverflowMethod = "fold" if index in narrowest else "ellipsis"
        table.add_column(header[index], min_width=widths[index], max_width=widths[index], overflow=overflow)
    for row in rows:
        table.add_row(*(row[index] for index in kept))
    return table


@contextmanager
def progress(console: Console | None, description: str, total: int) -> Iterator[Done | None]:
    """While a long phase runs on a terminal: a bar with the time elapsed and an estimate of the time left, gone when
    the phase ends (a log gets the phase's one-line summary instead). None without a terminal or work to show."""
    if console is None or not console.is_terminal or total <= 0:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda completed: bar.update(task, completed=completed)


def after(done: Done | None, offset: int) -> Done | None:
    """``done`` for a part of a phase that starts ``offset`` items in."""
    return None if done is None else lambda completed: done(offset + completed)


def clock_text(seconds: float) -> str:
    """``2:05`` or ``1:02:05``: a duration as a person reads it on a clock."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class SweepProgress:
    """Where a whole sweep stands, printed as each of its runs starts: ``run 17 of 54: dpo λ=0.1, seed 1 · 8:12
    elapsed, about 17:40 left``. The estimate is the mean time per run since the first run began times the runs left:
    the setup before it (SFT, labelling) is not a run's, though a later seed's setup is counted in (reused runs make
    it short at first). A line per run rather than a bar: a log keeps it, and the phases' own bars stay free. Only
    rank zero's console prints (the others are quiet)."""

    def __init__(self, total: int, console: Console, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.console, self.clock = total, console, clock
        self.started = clock()
        self.first_run_started: float | None = None
        self.begun = 0

    def start(self, what: str) -> None:
        """Run ``what`` begins."""
        now = self.clock()
        elapsed = now - self.started
        if self.first_run_started is None:
            self.first_run_started = now
        done, self.begun = self.begun, self.begun + 1
        timing = ""
        if done:
            left = (now - self.first_run_started) / done * (self.total - done)
            timing = f" · {clock_text(elapsed)} elapsed, about {clock_text(left)} left"
        self.console.print(f"run {self.begun} of {self.total}: {what}{timing}", style="bold", highlight=False)

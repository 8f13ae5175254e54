"""Terminal output: tables that never fold a cell, and progress bars with the time left on a terminal only."""

from __future__ import annotations

import io

from rich.console import Console

from expo_bench.reporting import SweepProgress, after, clock_text, progress, rich_table


def test_a_table_keeps_the_columns_that_fit_and_names_the_others() -> None:
    header = ["method", "a long metric name", "b", "c"]
    rows = [["expo_compositional_margin", "0.123456 ± 0.000001", "1.5", "2.25 ± 0.50"], ["dpo", "0.1", "2", "3"]]
    output = io.StringIO()
    Console(file=output, width=56).print(rich_table("title", header, rows, width=56, elsewhere="the .md"))
    lines = output.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 56
    assert any("expo_compositional_margin" in line and "0.123456 ± 0.000001" in line for line in lines)
    assert "Also in the .md: c." in " ".join(output.getvalue().split())  # the column that did not fit


def test_progress_shows_the_time_left_on_a_terminal_and_nothing_in_a_log() -> None:
    terminal = io.StringIO()
    with progress(Console(file=terminal, force_terminal=True, width=100), "reference samples", 4) as done:
        assert done is not None
        for completed in range(1, 5):
            after(done, 1)(completed - 1)  # a part of the phase that starts one item in
    shown = terminal.getvalue()
    assert "reference samples" in shown and "4/4" in shown and "left" in shown
    log = io.StringIO()
    with progress(Console(file=log, force_terminal=False), "reference samples", 4) as done:
        assert done is None
    assert log.getvalue() == ""
    with progress(None, "nothing to show", 4) as done:
        assert done is None


def test_sweep_progress_says_which_run_of_how_many_and_the_time_left() -> None:
    output, now = io.StringIO(), [100.0]
    sweep = SweepProgress(54, Console(file=output, width=120), clock=lambda: now[0])
    now[0] += 600.0  # SFT and labelling before the first run: not a run's time
    sweep.start("dpo λ=0.1, seed 0")
    now[0] += 16 * 30.0  # 16 runs of 30 s each
    sweep.begun = 16
    sweep.start("ipo λ=1, seed 1")
    first, seventeenth = output.getvalue().splitlines()
    assert first == "run 1 of 54: dpo λ=0.1, seed 0"  # nothing to estimate from yet
    assert seventeenth == "run 17 of 54: ipo λ=1, seed 1 · 18:00 elapsed, about 19:00 left"  # 38 runs × 30 s
    assert clock_text(3725) == "1:02:05" and clock_text(59.6) == "1:00"
    quiet = io.StringIO()
    SweepProgress(2, Console(file=quiet, quiet=True)).start("x")  # another rank's console: nothing
    assert quiet.getvalue() == ""


def test_required_columns_stay_and_the_wrapping_one_wraps_between_words() -> None:
    """The leaderboard's case at 80 columns: notes are kept (wrapped) and a narrow later column is left out."""
    header = ["method", "λ", "KL(π*‖π)", "Δ vs dpo", "notes", "length"]
    rows = [
        ["expo_compositional", "0.1", "1.057 ± 0.044", "+0.26 ± 1.9 (p 0.62)", "≈ best; grid edge: beta", "15.6"],
        ["dpo", "1", "5.0 ± 4.0", "—", "worse than best; grid edge: beta", "15.6"],
    ]
    output = io.StringIO()
    Console(file=output, width=80).print(rich_table("t", header, rows, width=80, elsewhere="the .md", required=5, wrap=[4]))
    text = output.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert all(word in text for word in ("≈", "best;", "grid", "edge:", "beta", "worse")) and "…" not in text
    assert "Also in the .md: length." in " ".join(text.split())
    wide = io.StringIO()
    Console(file=wide, width=200).print(rich_table("t", header, rows, width=200, required=5, wrap=[4]))
    assert any("≈ best; grid edge: beta" in line and "15.6" in line for line in wide.getvalue().splitlines())

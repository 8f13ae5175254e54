"""The leaderboard written out: the terminal table, leaderboard.md with its captions, leaderboard.csv (AlpacaEval's
columns first) and the plots beside them."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from rich.console import Console

from expo_bench.comparison import (
    Estimate,
    PairedDifference,
)
from expo_bench.leaderboard.plots import PLOTS
from expo_bench.leaderboard.table import LAM, Configuration, LeaderboardTable, RowVerdict, spread, table_title
from expo_bench.metric_keys import (
    JUDGED,
    LC_WIN_RATE,
    LEADERBOARD_COLUMNS,
    MEAN_LENGTH,
    WIN_RATE,
    WIN_RATE_STDERR,
    Metric,
    panel_columns,
)
from expo_bench.reporting import markdown_table, rich_table, with_interval
from expo_bench.tracking import (
    GIT_SHA,
    JUDGE,
    RECIPE_HASH,
    REGULARIZATION,
    sqlite_path,
)


def _cell(found: Estimate | None, spread: bool = True) -> str:
    return "—" if found is None else with_interval(found.mean, found.half_width if spread else None)


def _lam(row: Configuration) -> str:
    """The method's λ, whichever hyperparameter plays it (DPO's β, IPO's τ, EXPO's λ); — for a method without one."""
    regularization = next((run.tags[REGULARIZATION] for run in row.runs if REGULARIZATION in run.tags), None)
    for key in (LAM, f"params.{regularization}"):
        try:
            return f"{float(row.params[key]):g}"
        except (KeyError, ValueError):
            continue
    return "—"


def _params_text(params: dict[str, str]) -> str:
    """The method's hyperparameters (``params.*``); the full configuration is in the CSV and the store."""
    shown = {key.removeprefix("params."): value for key, value in params.items() if key.startswith("params.")}
    return ", ".join(f"{key}={value}" for key, value in shown.items()) or "—"


def _difference(found: PairedDifference | None, p_holm: float | None) -> str:
    """``-0.51 ± 0.48 (Holm p 0.13; sign-flip p 0.12)``: a paired difference, its CI half-width, the t-test's p-value
    Holm-adjusted over the column and the exact sign-flip p-value (the raw t-test p is in the CSV)."""
    if found is None:
        return "—"
    spread = "" if found.half_width is None else f" ± {found.half_width:.2g}"
    tests = [f"{name} p {p:.2g}" for name, p in (("Holm", p_holm), ("sign-flip", found.sign_flip_p)) if p is not None]
    return f"{found.mean:+.3g}{spread}" + (f" ({'; '.join(tests)})" if tests else "")


LC_MIN_JUDGED = 50
"""Fewer judged comparisons than this and the length-controlled GLM (three coefficients) is mostly noise."""
LC_SATURATED = 0.01
"""An LC win rate this close to 0 or 1 beside a raw rate that is not: the GLM separated, it did not measure."""


def lc_warning(row: Configuration) -> str | None:
    """Why a row's length-controlled win rate should not be read, if it should not: too few judged comparisons, or
    an LC at 0 or 1 beside a raw win rate away from it (a separated fit: AlpacaEval's GLM has no prior). Shown in
    the LC cell itself, so that it goes wherever the value goes."""
    lc, raw, judged = (row.estimates.get(key) for key in (LC_WIN_RATE.key, WIN_RATE.key, JUDGED.key))
    if lc is None or not math.isfinite(lc.mean):
        return None
    reasons = []
    if judged is not None and judged.mean < LC_MIN_JUDGED:
        reasons.append(f"{judged.mean:g} judged")
    if raw is not None and min(lc.mean, 1 - lc.mean) < LC_SATURATED and min(raw.mean, 1 - raw.mean) >= 5 * LC_SATURATED:
        reasons.append(f"{lc.mean:.2f} beside {raw.mean:.2f} raw")
    return f"unreliable: {', '.join(reasons)}" if reasons else None


def _metric_cell(row: Configuration, metric: Metric) -> str:
    text = _cell(spread(row, metric.key), metric.spread)
    warning = lc_warning(row) if metric.key == LC_WIN_RATE.key else None
    return text if warning is None else f"{text} ({warning})"


def _notes(verdict: RowVerdict) -> str:
    if verdict.versus_best is None:
        notes = ["best"]
    else:
        notes = ["not distinguishable from best" if verdict.not_distinguishable_from_best else "worse than best"]
    notes += [
        f"gain not confirmed by {label} (Δ {_difference(found, None)}): reward hacking?"
        for label, found in verdict.unconfirmed.items()
    ]
    notes += [f"grid edge: {edge}" for edge in verdict.edges]
    return "; ".join(notes)


def _equivalence(verdict: RowVerdict) -> str:
    """``shown (p 0.045)`` where TOST shows the row within the margin of the best, ``not shown (p 0.11)`` otherwise."""
    found = verdict.equivalent_to_best
    if found is None or found.p_value is None:
        return "—"
    return f"{'shown' if found.equivalent else 'not shown'} (p {found.p_value:.2g})"


def _defined(table: LeaderboardTable) -> list[Metric]:
    """The table's metrics that some row has a finite value of: one undefined in the setting (self-BLEU of one
    sample per prompt) is left out rather than shown as a column of n/a."""
    return [
        column
        for column in table.columns
        if any(math.isfinite(found.mean) for row in table.rows if (found := row.estimates.get(column.key)) is not None)
    ]


def _display(table: LeaderboardTable, terminal: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows, most wanted first: method, λ, the rank metric, the paired difference from the baseline and the
    verdict notes, seeds, the other metrics, then the configuration and provenance. A terminal gets neither of the last
    two, nor a seeds column when every row has as many seeds (its title says how many)."""
    metrics = _defined(table)
    rank = [metric for metric in metrics if metric.key == table.rank_metric]
    others = [metric for metric in metrics if metric.key != table.rank_metric]
    versus = [] if table.baseline is None else [f"Δ vs {table.baseline}" + ("" if terminal else " (paired)")]
    margin = table.equivalence_margin
    equivalent = [] if margin is None else [f"within ±{margin:.2g} of best (TOST)"]
    held_out = any(verdict.leave_one_seed_out for verdict in table.verdicts.values())
    picked_apart = [f"{title}, leave-one-seed-out pick" for title in (m.title for m in rank) if held_out]
    seeds = ["seeds"] if not terminal or len(_seed_counts(table)) > 1 else []
    provenance = [] if terminal else ["params", "runs", "git", "recipe"]
    header = [
        "method",
        "λ",
        *(m.title for m in rank),
        *versus,
        "notes",
        *equivalent,
        *picked_apart,
        *seeds,
        *(m.title for m in others),
        *provenance,
    ]
    rows = [
        [
            row.method,
            _lam(row),
            *(_metric_cell(row, metric) for metric in rank),
            *([] if table.baseline is None else [_difference(verdict.versus_baseline, verdict.baseline_p_holm)]),
            _notes(verdict),
            *([_equivalence(verdict)] if equivalent else []),
            *([_cell(verdict.leave_one_seed_out)] if picked_apart else []),
            *([str(len(row.runs))] if seeds else []),
            *(_metric_cell(row, metric) for metric in others),
            *(_provenance(row) if provenance else []),
        ]
        for row in table.rows
        for verdict in [table.verdicts[row.method]]
    ]
    return header, rows


def _provenance(row: Configuration) -> list[str]:
    return [
        _params_text(row.params),
        " ".join(run.run_id[:8] for run in row.runs),
        " ".join(sha[:12] + ("-dirty" if sha.endswith("-dirty") else "") for sha in row.provenance(GIT_SHA)) or "—",
        " ".join(row.provenance(RECIPE_HASH)) or "—",
    ]


def _seed_counts(table: LeaderboardTable) -> set[int]:
    return {len(row.runs) for row in table.rows}


def _terminal_title(table: LeaderboardTable) -> str:
    counts = _seed_counts(table)
    seeds = f" · {next(iter(counts))} seed{'s' if counts != {1} else ''} each" if len(counts) == 1 else ""
    return table_title(table) + seeds


def _shown(uri: str) -> str:
    """A store under the working directory as a relative URI: committed tables name no machine's paths."""
    database = sqlite_path(uri)
    if database is None or not database.absolute().is_relative_to(Path.cwd()):
        return uri
    return f"sqlite:///{database.absolute().relative_to(Path.cwd())}"


def _caption(table: LeaderboardTable) -> str:
    direction = "higher" if table.rank_goal == "max" else "lower"
    selected = {verdict.selected_by for verdict in table.verdicts.values()}
    if selected == {table.rank_metric}:
        picked = (
            f"Each method's configuration is picked on `{table.rank_metric}` itself, the reported metric: with a grid, its "
            "value is optimistic"
        )
    else:
        picked = (
            f"Each method's configuration is picked on {', '.join(f'`{key}`' for key in sorted(selected))}, computed on "
            "the evaluation prompts set aside for selection and never reported (whether they are also training prompts "
            "depends on the task: see docs/statistics.md)"
        )
    if table.kl_budget is not None:
        picked += (
            f"; only configurations whose mean KL(π‖π_ref) is at most {table.kl_budget:g} compete (measured on "
            "the selection prompts where they were set aside)"
        )
    unit = "seed"
    if len(table.instances) > 1:
        unit = "task instance"
        picked += (
            f"; pooled over {len(table.instances)} task instances: every statistic treats an instance (the mean over its "
            "seeds) as one replication, and pairs instances"
        )
    versus = (
        ""
        if table.baseline is None
        else f"; Δ: the paired per-{unit} difference from `{table.baseline}` (mean ± 95% CI; the paired t-test's p "
        "Holm-adjusted over the column, raw p in the CSV; the exact sign-flip test's p, which at n pairs cannot go below "
        "2/2^n)"
    )
    equivalent = (
        ""
        if table.equivalence_margin is None
        else f' "within ±{table.equivalence_margin:.2g} of best": two one-sided paired t-tests (TOST, 5%) show the row\'s '
        "difference from the best row inside that margin (shown) or fail to (not shown); the margin is a stated fraction "
        "of the best row's gap to the baseline, or the recipe's `statistics.equivalence_margin`."
    )
    return (
        f"Rows ranked by `{table.rank_metric}` ({direction} is better); mean ± 95% CI over {unit}s (Student t), or with one "
        f"seed over the run's prompts (1.96 standard errors){versus}. "
        f'{picked}. "not distinguishable from best": a paired t-test against the best row (Holm-corrected over the rows, '
        f"5%) does not reject equality; that is no evidence the two are equal.{equivalent} "
        f'"grid edge": the picked value is the lowest or highest its grid tried.{_lc_caption(table)} '
        f"Source: {_shown(table.store)}." + _judges_note(table) + _unranked_note(table)
    )


def _unranked_note(table: LeaderboardTable) -> str:
    if not table.unranked:
        return ""
    why = "a non-finite metric in every configuration"
    if table.kl_budget is not None:
        why = f"no configuration within KL ≤ {table.kl_budget:g} with finite metrics"
    return f" Not ranked ({why}): {', '.join(table.unranked)}."


def _lc_caption(table: LeaderboardTable) -> str:
    if not any(lc_warning(row) for row in table.rows):
        return ""
    return (
        f' LC "unreliable": fewer than {LC_MIN_JUDGED} judged comparisons, or a length-controlled win rate at 0 or 1 '
        "beside a raw one that is not (the length GLM separated the data): read the raw win rate."
    )


def _judges_note(table: LeaderboardTable) -> str:
    """Which judge each label in the columns is (``j2``, ``truth``), where the runs had several."""
    panels = {judges for row in table.rows for judges in row.provenance(JUDGE) if "=" in judges}
    return f" Judges: {'; '.join(sorted(panels))} (docs/judges.md)." if panels else ""


Cell = Callable[[LeaderboardTable, Configuration], str]


def _number(found: Estimate | None, half_width: bool = False) -> str:
    value = None if found is None else found.half_width if half_width else found.mean
    return "" if value is None else repr(value)


def _number_or_blank(value: float | int | None) -> str:
    return "" if value is None else repr(value)


def _paired(found: PairedDifference | None, field: str) -> str:
    return "" if found is None else _number_or_blank(getattr(found, field))


def _equivalence_field(verdict: RowVerdict, field: str) -> str:
    found = verdict.equivalent_to_best
    return "" if found is None or found.p_value is None else str(getattr(found, field))


def _mean(key: str) -> Cell:
    return lambda table, row: _number(row.estimates.get(key))


def _ci95(key: str) -> Cell:
    return lambda table, row: _number(row.estimates.get(key), half_width=True)


def _csv_columns(tables: Sequence[LeaderboardTable]) -> list[tuple[str, Cell]]:
    """AlpacaEval's leading columns, the other metrics (mean, CI half-width) that any row logged, then provenance.

    ``standard_error`` is AlpacaEval's: the judged win rate's own, over prompts (averaged over seeds); ``*_ci95`` is the
    half-width of the 95% CI over seeds.
    """
    columns: list[tuple[str, Cell]] = [
        ("method", lambda table, row: row.method),
        ("win_rate", _mean(WIN_RATE.key)),
        ("standard_error", _mean(WIN_RATE_STDERR.key)),
        ("lc_win_rate", _mean(LC_WIN_RATE.key)),
        ("n_total", _mean(JUDGED.key)),
        ("avg_length", _mean(MEAN_LENGTH.key)),
        ("win_rate_ci95", _ci95(WIN_RATE.key)),
        ("lc_win_rate_ci95", _ci95(LC_WIN_RATE.key)),
    ]
    logged = {key for table in tables for row in table.rows for key in row.estimates}
    leading = {WIN_RATE.key, LC_WIN_RATE.key, MEAN_LENGTH.key}
    rest = [column.key for column in LEADERBOARD_COLUMNS if column.key not in leading]
    rest += [column.key for column in panel_columns(logged)]
    rest += sorted({table.rank_metric for table in tables} - {column.key for column in LEADERBOARD_COLUMNS})
    for key in rest:
        if key in logged:
            columns += [(key, _mean(key)), (f"{key}_ci95", _ci95(key))]
    return [
        *columns,
        ("selected_by", lambda table, row: table.verdicts[row.method].selected_by),
        ("vs_baseline", lambda table, row: table.baseline or ""),
        ("vs_baseline_difference", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "mean")),
        ("vs_baseline_ci95", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "half_width")),
        ("vs_baseline_p", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "p_value")),
        ("vs_baseline_p_holm", lambda table, row: _number_or_blank(table.verdicts[row.method].baseline_p_holm)),
        ("vs_baseline_sign_flip_p", lambda table, row: _paired(table.verdicts[row.method].versus_baseline, "sign_flip_p")),
        ("vs_best_difference", lambda table, row: _paired(table.verdicts[row.method].versus_best, "mean")),
        ("vs_best_p", lambda table, row: _paired(table.verdicts[row.method].versus_best, "p_value")),
        ("vs_best_p_holm", lambda table, row: _number_or_blank(table.verdicts[row.method].best_p_holm)),
        ("vs_best_sign_flip_p", lambda table, row: _paired(table.verdicts[row.method].versus_best, "sign_flip_p")),
        ("not_distinguishable_from_best", lambda table, row: str(table.verdicts[row.method].not_distinguishable_from_best)),
        ("equivalence_margin", lambda table, row: _number_or_blank(table.equivalence_margin)),
        ("equivalence_p", lambda table, row: _equivalence_field(table.verdicts[row.method], "p_value")),
        ("equivalent_to_best", lambda table, row: _equivalence_field(table.verdicts[row.method], "equivalent")),
        ("rank_leave_one_seed_out", lambda table, row: _number(table.verdicts[row.method].leave_one_seed_out)),
        (
            "rank_leave_one_seed_out_ci95",
            lambda table, row: _number(table.verdicts[row.method].leave_one_seed_out, half_width=True),
        ),
        ("grid_edges", lambda table, row: "; ".join(table.verdicts[row.method].edges)),
        ("n_seeds", lambda table, row: str(len(row.runs))),
        ("instances", lambda table, row: " ".join(row.instances)),
        ("rank_metric", lambda table, row: table.rank_metric),
        ("experiment", lambda table, row: table.experiment),
        ("dataset", lambda table, row: table.dataset),
        ("config_key", lambda table, row: row.config_key),
        ("params", lambda table, row: json.dumps(row.params, sort_keys=True)),
        ("run_ids", lambda table, row: " ".join(run.run_id for run in row.runs)),
        ("git_sha", lambda table, row: " ".join(row.provenance(GIT_SHA))),
        ("recipe_hash", lambda table, row: " ".join(row.provenance(RECIPE_HASH))),
    ]


def _write_csv(tables: Sequence[LeaderboardTable], path: Path, with_budget: bool = False) -> None:
    columns = _csv_columns(tables)
    if with_budget:
        columns.insert(1, ("kl_budget", lambda table, row: _number_or_blank(table.kl_budget)))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in columns])
        writer.writerows([cell(table, row) for _, cell in columns] for table in tables for row in table.rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write_leaderboard(tables: Sequence[LeaderboardTable], out_dir: Path, console: Console) -> list[Path]:
    """Print each table; write ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard-<table>-<plot>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    several = len({table.experiment for table in tables}) > 1
    sections = ["# Leaderboard\n\nGenerated by `expo-bench leaderboard` from the tracking store: do not edit.\n"]
    written = []
    for table in tables:
        header, rows = _display(table, terminal=True)
        # the verdict and the grid edges qualify the rows: kept, with Δ and its tests, wrapped between words if need be
        notes = header.index("notes")
        wrap = [*(index for index, name in enumerate(header) if name.startswith("Δ vs")), notes]
        console.print(rich_table(_terminal_title(table), header, rows, console.width, "leaderboard.md", notes + 1, wrap))
        console.print(_caption(table), style="dim", highlight=False)
        header, rows = _display(table)
        scope = f"-instance-{table.instances[0]}" if len(table.instances) == 1 else ""  # beside the pooled table's
        scope += "" if table.kl_budget is None else f"-kl-{table.kl_budget:g}"
        slug = _slug(f"{table.experiment}-{table.dataset}" if several else table.dataset) + scope
        images = [path for name, plot in PLOTS.items() if (path := plot(table, out_dir / f"leaderboard-{slug}-{name}.png"))]
        figures = "".join(f"\n![{path.stem}]({path.name})\n" for path in images)
        sections.append(f"## {table_title(table)}\n\n{_caption(table)}\n\n{markdown_table(header, rows)}{figures}")
        written += images
    markdown = out_dir / "leaderboard.md"
    markdown.write_text("\n".join(sections))
    table_csv = out_dir / "leaderboard.csv"
    _write_csv([table for table in tables if table.kl_budget is None], table_csv)
    at_budgets = [table for table in tables if table.kl_budget is not None]
    if at_budgets:  # their own file: leaderboard.csv keeps its columns
        budgets_csv = out_dir / "leaderboard-kl-budgets.csv"
        _write_csv(at_budgets, budgets_csv, with_budget=True)
        written.insert(0, budgets_csv)
    return [markdown, table_csv, *written]

"""The leaderboard from a tracking store: exact means and Student-t CIs, best configurations, files, CLI and UI."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from network import free_port
from scipy import stats

from expo_bench import metric_keys as keys
from expo_bench import tracking
from expo_bench.cli import EXIT_USER_ERROR, main
from expo_bench.comparison import estimate
from expo_bench.leaderboard import (
    LeaderboardTable,
    StoredRun,
    build_table,
    load_leaderboard,
    write_leaderboard,
)
from expo_bench.leaderboard.render import _caption
from expo_bench.tracking import SweepTracker

T_975_2 = 4.302652729911275  # t_{0.975, 2}: three seeds

# dataset → rank (metric, goal) and method → λ → per-seed values of the rank metric
HH = {"dpo": {0.1: [0.50, 0.55, 0.60], 1.0: [0.60, 0.62, 0.70]}, "expo": {0.1: [0.70, 0.75, 0.77], 1.0: [0.40, 0.45, 0.41]}}
SYNTHETIC = {"dpo": {0.1: [0.30, 0.35, 0.32], 1.0: [0.50, 0.52, 0.51]}, "expo": {0.1: [0.20], 1.0: [0.10, 0.12, 0.11]}}
DATASETS = {"hh": (keys.WIN_RATE.key, "max", HH), "synthetic": (keys.KL_TO_TARGET.key, "min", SYNTHETIC)}
TEMPERATURES = (0.5, 1.0)


def hh_metrics(value: float, seed: int) -> dict[str, float]:
    return {
        keys.WIN_RATE.key: value,
        keys.WIN_RATE_STDERR.key: 0.02 + 0.01 * seed,
        keys.LC_WIN_RATE.key: value - 0.05,
        keys.JUDGED.key: 100.0,
        keys.MEAN_LENGTH.key: 200.0 + seed,
        keys.REWARD.key: 2 * value,
        keys.KL.key: 1.0 + seed,
        **{keys.at_temperature(keys.WIN_RATE.key, t): value - 0.1 * t for t in TEMPERATURES},
        **{keys.at_temperature(keys.DISTINCT_2.key, t): 0.5 + 0.1 * t for t in TEMPERATURES},  # the diversity plot's x
    }


def synthetic_metrics(value: float, seed: int) -> dict[str, float]:
    return {keys.KL_TO_TARGET.key: value, keys.TOP_RESPONSE_MASS.key: 1 - value}


def log_store(uri: str) -> dict[tuple[str, str, float], list[str]]:
    """Both datasets as one sweep, plus a run never completed; returns (dataset, method, λ) → run ids."""
    ids: dict[tuple[str, str, float], list[str]] = {}
    with SweepTracker(uri, "exp", "recipe0", {"experiment": "exp"}, {}) as sweep:
        for dataset, (metric, goal, grid) in DATASETS.items():
            for method, by_lam in grid.items():
                for lam, values in by_lam.items():
                    for seed, value in enumerate(values):
                        tags = {
                            tracking.METHOD: method,
                            tracking.DATASET: dataset,
                            tracking.SEED: str(seed),
                            tracking.CONFIG_KEY: f"{dataset}-{method}-{lam:g}",
                            tracking.RANK_METRIC: metric,
                            tracking.RANK_GOAL: goal,
                            tracking.GIT_SHA: "0123456789abcdef",
                            tracking.RECIPE_HASH: "recipe0",
                        }
                        run = sweep.child(f"{dataset}/{method}/{lam:g}/{seed}", method, {"lam": lam, "seed": seed}, tags)
                        run.log_metrics((hh_metrics if dataset == "hh" else synthetic_metrics)(value, seed))
                        run.mark_complete()
                        ids.setdefault((dataset, method, lam), []).append(run.run_id)
        unfinished = {tracking.METHOD: "expo", tracking.DATASET: "hh", tracking.CONFIG_KEY: "hh-expo-1", tracking.SEED: "3"}
        sweep.child("hh/expo/1/3", "expo", {"lam": 1.0, "seed": 3}, unfinished).log_metrics({keys.WIN_RATE.key: 0.0})
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    results = tmp_path_factory.mktemp("results")
    uri = f"sqlite:///{results / 'mlflow.db'}"  # the default store, whatever $MLFLOW_TRACKING_URI says
    return {"uri": uri, "results": results, "ids": log_store(uri), "tables": load_leaderboard(uri, "exp")}


def expected_ci(values: list[float]) -> float:
    return float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def test_estimate_is_the_student_t_interval() -> None:
    values = [0.50, 0.55, 0.60]
    found = estimate(values)
    assert found.mean == pytest.approx(0.55) and found.n == 3
    assert found.half_width == pytest.approx(expected_ci(values))
    assert found.half_width == pytest.approx(T_975_2 * 0.05 / math.sqrt(3))
    assert estimate([0.2]).half_width is None


def test_best_configuration_per_method_for_max_and_min_goals(store: dict[str, Any]) -> None:
    tables: list[LeaderboardTable] = store["tables"]
    assert [(table.experiment, table.dataset) for table in tables] == [("exp", "hh"), ("exp", "synthetic")]
    for table, (metric, goal, grid) in zip(tables, DATASETS.values(), strict=True):
        assert (table.rank_metric, table.rank_goal) == (metric, goal)
        means = {(method, lam): statistics.fmean(values) for method, by_lam in grid.items() for lam, values in by_lam.items()}
        sign = -1 if goal == "max" else 1
        best = {method: min(by_lam, key=lambda lam, method=method: sign * means[method, lam]) for method, by_lam in grid.items()}
        order = sorted(best, key=lambda method: sign * means[method, best[method]])
        assert [row.method for row in table.rows] == order
        for row in table.rows:
            values = grid[row.method][best[row.method]]
            found = row.estimates[metric]
            assert found.mean == pytest.approx(statistics.fmean(values)) and found.n == len(values)
            assert found.half_width == pytest.approx(expected_ci(values))
            assert [run.run_id for run in row.runs] == store["ids"][table.dataset, row.method, best[row.method]]
            assert row.params == {"lam": str(best[row.method])}  # the seed differs between runs: not a config param
            assert row.provenance(tracking.GIT_SHA) == ["0123456789abcdef"]
            assert row.provenance(tracking.RECIPE_HASH) == ["recipe0"]
    hh, synthetic = tables
    assert [row.method for row in hh.rows] == ["expo", "dpo"] and [row.method for row in synthetic.rows] == ["expo", "dpo"]
    assert len(hh.configurations) == 4 and all(len(c.runs) == 3 for c in hh.configurations)  # the unfinished run is left out
    single = next(c for c in synthetic.configurations if c.config_key == "synthetic-expo-0.1")
    assert single.estimates[keys.KL_TO_TARGET.key].half_width is None
    assert [column.key for column in hh.columns] == [
        keys.WIN_RATE.key,
        keys.LC_WIN_RATE.key,
        keys.REWARD.key,
        keys.KL.key,
        keys.MEAN_LENGTH.key,
    ]
    assert [column.key for column in synthetic.columns] == [keys.KL_TO_TARGET.key, keys.TOP_RESPONSE_MASS.key]


def test_markdown_csv_and_plots(store: dict[str, Any], tmp_path: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=250)
    written = write_leaderboard(store["tables"], tmp_path, console)
    names = sorted(path.name for path in written)
    assert names == sorted(
        [
            "leaderboard.md",
            "leaderboard.csv",
            *(f"leaderboard-hh-{plot}.png" for plot in ("ranking", "lam_sweep", "reward_kl", "temperature", "diversity")),
            *(f"leaderboard-synthetic-{plot}.png" for plot in ("ranking", "lam_sweep")),  # no reward, KL or temperatures
        ]
    )
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hh_expo = [0.70, 0.75, 0.77]
    expo_cell = "0.740 ± 0.090"  # the mean to the CI's two significant digits
    assert expected_ci(hh_expo) == pytest.approx(0.0896, abs=1e-4)
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert "## exp · hh" in markdown and "## exp · synthetic" in markdown
    assert (
        "| method | λ | win rate | Δ vs dpo (paired) | notes | within ±0.05 of best (TOST) | seeds | LC win rate | reward "
        "| KL(π‖π_ref) | length | params | runs | git | recipe |" in markdown
    )
    # one comparison with the baseline: Holm leaves its p as it is; three seeds: the sign-flip p cannot go below 2/8
    assert f"| expo | 0.1 | {expo_cell} | +0.1 ± 0.075 (Holm p 0.029; sign-flip p 0.25) | best | — | 3 |" in markdown
    assert "| dpo | 1 | 0.64 ± 0.13 | — | worse than best | not shown (p 0.95) | 3 |" in markdown and "0123456789ab" in markdown
    assert "![leaderboard-hh-ranking](leaderboard-hh-ranking.png)" in markdown
    assert expo_cell in console.export_text()

    with (tmp_path / "leaderboard.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    header = list(rows[0])
    assert header[:6] == ["method", "win_rate", "standard_error", "lc_win_rate", "n_total", "avg_length"]
    assert header[-8:] == ["rank_metric", "experiment", "dataset", "config_key", "params", "run_ids", "git_sha", "recipe_hash"]
    assert [(row["dataset"], row["method"]) for row in rows] == [
        ("hh", "expo"),
        ("hh", "dpo"),
        ("synthetic", "expo"),
        ("synthetic", "dpo"),
    ]
    expo = rows[0]
    assert float(expo["win_rate"]) == pytest.approx(statistics.fmean(hh_expo))
    assert float(expo["win_rate_ci95"]) == pytest.approx(expected_ci(hh_expo))
    assert float(expo["standard_error"]) == pytest.approx(0.03)  # the judge's own, averaged over seeds
    assert float(expo["lc_win_rate"]) == pytest.approx(statistics.fmean(hh_expo) - 0.05)
    assert float(expo["n_total"]) == 100 and float(expo["avg_length"]) == pytest.approx(201)
    assert expo["n_seeds"] == "3" and json.loads(expo["params"]) == {"lam": "0.1"}
    assert expo["run_ids"].split() == store["ids"]["hh", "expo", 0.1]
    synthetic_expo = rows[2]
    assert float(synthetic_expo[keys.KL_TO_TARGET.key]) == pytest.approx(0.11)
    assert float(synthetic_expo[f"{keys.KL_TO_TARGET.key}_ci95"]) == pytest.approx(expected_ci([0.10, 0.12, 0.11]))
    assert synthetic_expo["win_rate"] == "" and synthetic_expo["rank_metric"] == keys.KL_TO_TARGET.key


def test_cli_writes_into_the_experiment_folder(store: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["leaderboard", "exp", "--results", str(store["results"])]) == 0
    out = store["results"] / "exp"
    assert (out / "leaderboard.md").is_file() and (out / "leaderboard.csv").is_file()
    assert main(["leaderboard", "--results", str(store["results"]), "--tracking-uri", store["uri"]]) == 0
    assert (store["results"] / "leaderboard" / "leaderboard-hh-ranking.png").is_file()


def test_cli_names_what_is_missing(store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leaderboard", "exq", "--tracking-uri", store["uri"]]) == EXIT_USER_ERROR
    err = " ".join(capsys.readouterr().err.split())
    assert "no experiment 'exq'" in err and "did you mean 'exp'?" in err and "experiments there: Default, exp" in err
    assert main(["leaderboard", "--results", str(tmp_path)]) == EXIT_USER_ERROR
    err = " ".join(capsys.readouterr().err.split())
    assert f"no tracking store at {tmp_path / 'mlflow.db'}" in err
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create an empty store


def _descendants(pid: int) -> set[int]:
    """Processes below ``pid`` (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.loads(response.read()))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server's processes in /proc")
def test_ui_serves_the_store_and_stops_without_orphans(store: dict[str, Any], tmp_path: Path) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "expo_bench", "ui", "--results", str(store["results"]), "--port", str(port)],
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert ui.poll() is None, ui.communicate()[0]
            try:
                experiments = _post(f"{base}/experiments/search", {"max_results": 10})["experiments"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 60 s"
                time.sleep(0.5)
        experiment_id = next(e["experiment_id"] for e in experiments if e["name"] == "exp")
        runs = _post(f"{base}/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
        assert len(runs) == 1 + 12 + 10 + 1  # parent, hh, synthetic, the unfinished run
        win_rates = [m["value"] for run in runs for m in run["data"].get("metrics", []) if m["key"] == keys.WIN_RATE.key]
        assert sorted(win_rates)[-1] == pytest.approx(0.77)
        children = _descendants(ui.pid)
        assert children, "the UI runs the MLflow server as a child process"
        ui.send_signal(signal.SIGTERM)  # to the expo-bench process only: it must stop the server and its workers
        output = ui.communicate(timeout=30)[0]
        assert f"http://127.0.0.1:{port}" in output and "viewStateShareKey=leaderboard" in output
        view = next(line for line in output.splitlines() if "viewStateShareKey" in line)
        assert view.endswith("viewStateShareKey=leaderboard") and f"http://127.0.0.1:{port}/#/experiments/" in view  # unfolded
        assert "uvicorn" not in output.lower() and "gunicorn" not in output.lower() and "INFO" not in output  # no chatter
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)]
        assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns").exists()
    finally:
        for pid in [ui.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        ui.wait()


ONE_SEED = {
    "sft-reference": 0.50,
    "dpo": 0.62,
    "ipo": 0.58,
    "simpo": 0.55,
    "expo_compositional": 0.71,
    "expo_regression": 0.64,
    "expo_compositional_margin": 0.69,
}


def one_seed_store(uri: str) -> None:
    """An HH-like sweep with one seed: per-run standard errors, and a self-BLEU undefined with one sample per prompt."""
    with SweepTracker(uri, "one", "recipe1", {"experiment": "one"}, {}) as sweep:
        for method, value in ONE_SEED.items():
            tags = {
                tracking.METHOD: method,
                tracking.DATASET: "hh-rlhf/helpful-base",
                tracking.CONFIG_KEY: method,
                tracking.RANK_METRIC: keys.WIN_RATE.key,
                tracking.RANK_GOAL: "max",
                tracking.REGULARIZATION: {"dpo": "beta", "ipo": "tau"}.get(method, "lam"),
            }
            params = {"params": {"beta": 0.1, "tau": 0.1, "lam": 0.1, "gamma": 0.0}} if method != "sft-reference" else {}
            run = sweep.child(method, method, params, tags)
            run.log_metrics(
                {
                    keys.WIN_RATE.key: value,
                    keys.WIN_RATE_STDERR.key: 0.171,
                    keys.LC_WIN_RATE.key: value - 0.01,
                    keys.JUDGED.key: 8.0,
                    keys.KL.key: 0.0123 * (1 + len(method)),
                    keys.KL_STDERR.key: 0.0042,
                    keys.DISTINCT_2.key: 0.93,
                    keys.SELF_BLEU.key: math.nan,
                    keys.ENTROPY_2.key: 0.88,
                    keys.MEAN_LENGTH.key: 15.6,
                    keys.VAL_PREFERENCE_ACCURACY.key: 0.53,
                }
            )
            run.mark_complete()


def test_terminal_table_fits_80_columns_without_folding(tmp_path: Path) -> None:
    from rich.console import Console

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one_seed_store(uri)
    output = io.StringIO()
    console = Console(file=output, width=80, force_terminal=False)  # what a pipe or a CI log gets
    write_leaderboard(load_leaderboard(uri, "one"), tmp_path / "out", console)
    lines = output.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line for line in lines if line.strip() and line.split()[0] in ONE_SEED}
    assert set(rows) == set(ONE_SEED)  # each row on one line of its own: no cell folded onto another line
    assert "0.71 ± 0.34" in rows["expo_compositional"]  # one seed: 1.96 × the judge's standard error over prompts
    assert rows["dpo"].split()[1] == "0.1" and rows["expo_regression"].split()[1] == "0.1"  # λ: β for DPO, λ for EXPO
    assert rows["sft-reference"].split()[1] == "—"
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "self-BLEU" not in markdown and "self-BLEU" not in output.getvalue()  # undefined: left out, not n/a
    assert "KL(π‖π_ref)" in markdown and "0.3198 ± 0.0082" in markdown  # the KL estimate with its standard error
    assert "| 0.7 (unreliable: 8 judged) |" in markdown and 'LC "unreliable": fewer than 50' in markdown  # 8 prompts
    caption = " ".join(output.getvalue().split())
    assert "Also in " in caption and "length" in caption  # what did not fit is named, and is in the files
    assert not list((tmp_path / "out").glob("*lam_sweep*"))  # every method tried one λ: no sweep to plot


def test_an_llm_judged_run_shows_kl_and_its_judges_audit(tmp_path: Path) -> None:
    from rich.console import Console

    from expo_bench.reporting import with_interval

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = {
        keys.WIN_RATE.key: 0.6,
        keys.WIN_RATE_STDERR.key: 0.05,
        keys.KL.key: 2.0,
        keys.KL_STDERR.key: 0.25,
        keys.FIRST_POSITION_WINS.key: 0.7,
        f"{keys.FIRST_POSITION_WINS.key}_stderr": 0.04,
        "eval/j2/win_rate": 0.4,
        "eval/j2/stderr": 0.03,
        "eval/j1_j2/kappa": 0.5,
        "eval/j1_j2/kappa_stderr": 0.1,
    }
    with SweepTracker(uri, "judged", "recipe0", {"experiment": "judged"}, {}) as sweep:
        tags = {
            tracking.METHOD: "dpo",
            tracking.DATASET: "hh",
            tracking.SEED: "0",
            tracking.CONFIG_KEY: "dpo",
            tracking.JUDGE: "j1=llm:big, j2=llm:small",
        }
        run = sweep.child("dpo/0", "dpo", {"lam": 0.1}, tags)
        run.log_metrics(metrics)
        run.mark_complete()
    written = write_leaderboard(load_leaderboard(uri, "judged"), tmp_path / "out", Console(quiet=True))
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    cells = dict(zip(lines[0].strip("| ").split(" | "), lines[1].strip("| ").split(" | "), strict=True))
    # one seed: each metric ± 1.96 of its own standard error over prompts
    assert cells["KL(π‖π_ref)"] == with_interval(2.0, 1.96 * 0.25)
    assert cells["P(first wins)"] == with_interval(0.7, 1.96 * 0.04)
    assert cells["win rate j2"] == with_interval(0.4, 1.96 * 0.03)
    assert cells["κ j1–j2"] == with_interval(0.5, 1.96 * 0.1)
    assert "Judges: j1=llm:big, j2=llm:small" in markdown
    assert any(path.name.endswith("-reward_kl.png") for path in written), "without rewards: win rate against KL"
    header = next(csv.reader(io.StringIO((tmp_path / "out" / "leaderboard.csv").read_text())))
    assert {"eval/first_position_wins", "eval/j2/win_rate", "eval/j1_j2/kappa_ci95"} <= set(header)


def test_a_degenerate_length_controlled_win_rate_is_flagged() -> None:
    from expo_bench.leaderboard import Configuration, StoredRun, lc_warning

    def row(lc: float, raw: float, judged: float) -> Configuration:
        metrics = {keys.LC_WIN_RATE.key: lc, keys.WIN_RATE.key: raw, keys.JUDGED.key: judged}
        return Configuration("dpo", "dpo", (StoredRun("r", metrics, {}, {}),))

    assert lc_warning(row(1.0, 0.19, 16)) == "unreliable: 16 judged, 1.00 beside 0.19 raw"  # the case
    assert lc_warning(row(0.0, 0.4, 805)) == "unreliable: 0.00 beside 0.40 raw"
    assert lc_warning(row(0.62, 0.6, 49)) == "unreliable: 49 judged"
    assert lc_warning(row(0.62, 0.6, 805)) is None and lc_warning(row(0.999, 0.99, 805)) is None  # a real sweep
    assert lc_warning(Configuration("dpo", "dpo", (StoredRun("r", {keys.WIN_RATE.key: 0.5}, {}, {}),))) is None


def test_the_notes_stay_at_80_columns_beside_a_wide_paired_difference(store: dict[str, Any], tmp_path: Path) -> None:
    """Δ with its tests is ~46 characters: Δ and the notes wrap between words, and a later column is left out instead."""
    from rich.console import Console

    output = io.StringIO()
    write_leaderboard(store["tables"], tmp_path / "out", Console(file=output, width=80, force_terminal=False))
    lines = output.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line for line in lines if line.strip() and line.split()[0] in ("expo", "dpo")}
    assert rows["dpo"].rstrip().endswith("worse than best") and rows["expo"].rstrip().endswith("best")
    assert "sign-flip" in output.getvalue()  # Δ's tests wrapped onto a second line, not cut


def test_a_non_finite_metric_is_never_ranked() -> None:
    """A configuration whose picking metric is NaN is never picked, whatever a sort would make of NaN; a method with no
    finite configuration gets no row, and the caption names it."""

    def run(method: str, key: str, value: float, seed: int) -> StoredRun:
        tags = {tracking.METHOD: method, tracking.CONFIG_KEY: key, tracking.SEED: str(seed)}
        tags |= {tracking.RANK_METRIC: keys.WIN_RATE.key, tracking.RANK_GOAL: "max"}
        return StoredRun(f"{key}-{seed}", {keys.WIN_RATE.key: value}, {"params.beta": key}, tags)

    runs = [run("dpo", "dpo-nan", math.nan, seed) for seed in range(2)]
    runs += [run("dpo", "dpo-fine", 0.6, seed) for seed in range(2)]
    runs += [run("ipo", "ipo-inf", math.inf, seed) for seed in range(2)]
    runs += [run("expo", "expo", 0.7, seed) for seed in range(2)]
    table = build_table("sqlite:///store.db", "demo", "demo", runs)
    assert [(row.method, row.config_key) for row in table.rows] == [("expo", "expo"), ("dpo", "dpo-fine")]
    assert table.unranked == ("ipo",)
    assert "Not ranked (a non-finite metric in every configuration): ipo." in _caption(table)

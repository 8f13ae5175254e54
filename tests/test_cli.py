"""The command line: help, validate, and user mistakes as one clear message with exit status 2."""

from __future__ import annotations

import errno
import io
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA, needs_shared_data, require_shared_data

from expo_bench.cli import EXIT_USER_ERROR, main
from expo_bench.methods import available_methods
from expo_bench.recipe import load_recipe, validate_recipe

ROOT = Path(__file__).parent.parent


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "validate" in out


def test_validate_a_shipped_recipe(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["validate", str(ROOT / "recipes/synthetic_interpolation.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "expo_compositional" in out


def test_validate_rows_differ_in_what_an_80_column_terminal_shows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grid over the learning rate splits a method into one run per rate: the rows say which, even at 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["validate", str(ROOT / "recipes/synthetic_tokens_tuned.yaml")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" dpo ")]
    assert len(rows) == 2 and len(set(rows)) == 2 and "optimizer.lr=0.0003" in rows[0]
    assert max(len(line) for line in rows) <= 80


def test_validate_reports_the_field_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(ROOT / "recipes/synthetic_interpolation.yaml")
    assert main(["validate", recipe, "--set", "methods.4.lam=[0.5, 2.0]"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert recipe in err and "methods[4].lam[1]" in err and "less than or equal to 1" in err


def test_user_mistake_in_a_fresh_process_has_no_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((ROOT / "recipes/synthetic_interpolation.yaml").read_text().replace("draws_per_prompt", "draws_per_promt"))
    result = subprocess.run(
        [sys.executable, "-m", "expo_bench", "run", str(recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_USER_ERROR
    assert "Traceback" not in result.stderr
    assert "task.draws_per_promt" in result.stderr and "did you mean 'draws_per_prompt'" in result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


SHARED = SHARED_DATA
NEEDS_DATA = {"missing tokenizer folder", "empty HH file", "empty IMDb file", "typo in model.tiny"}


def hh_recipe(tmp_path: Path, name: str, **task: object) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "hh_tiny_local.yaml").read_text())
    data["task"] |= {"source": str(SHARED / "hh-rlhf"), "tokenizer": str(SHARED / "tokenizers" / "gpt-neox-20b"), **task}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: the command line, and what its one message must say."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes((ROOT / "recipes" / "quickstart.yaml").read_bytes().replace(b"quickstart", b"caf\xe9"))
    empty_hh = tmp_path / "hh-empty" / "helpful-base"
    empty_hh.mkdir(parents=True)
    (empty_hh / "test.jsonl").write_text("")
    empty_imdb = tmp_path / "imdb-empty"
    empty_imdb.mkdir()
    (empty_imdb / "train.jsonl").write_text('{"text": "fine", "label": 1}\n')
    (empty_imdb / "test.jsonl").write_text("\n\n")
    imdb = yaml.safe_load((ROOT / "recipes" / "imdb_tiny_local.yaml").read_text())
    imdb["task"] |= {
        "source": str(empty_imdb),
        "tokenizer": str(SHARED / "tokenizers" / "gpt2"),
        "train_split": "train",
        "eval_split": "test",
    }
    (tmp_path / "imdb.yaml").write_text(yaml.safe_dump(imdb))
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    return {
        "non-UTF-8 recipe": ([str(latin1)], "not UTF-8 text: byte 0xe9"),
        "--set value not YAML": ([quickstart, "--set", "train.max_epochs=[1"], "train.max_epochs: value '[1' is not valid YAML"),
        "missing tokenizer folder": (
            [str(hh_recipe(tmp_path, "no-tokenizer", tokenizer=str(tmp_path / "tokenizers" / "pythia")))],
            "task.tokenizer: Value error, no such file or folder",
        ),
        "optimizer kwarg typo": (
            [quickstart, "--set", "train.optimizer.kwargs={betass: [0.9, 0.99]}"],
            "train.optimizer.kwargs.betass: unknown key 'betass' for torch.optim.AdamW (did you mean 'betas'?)",
        ),
        "empty HH file": (
            [str(hh_recipe(tmp_path, "empty-hh", source=str(tmp_path / "hh-empty")))],
            "test.jsonl: the file is empty",
        ),
        "empty IMDb file": ([str(tmp_path / "imdb.yaml")], "test.jsonl: the file is empty"),
        "lr .inf": ([quickstart, "--set", "train.optimizer.lr=.inf"], "train.optimizer.lr: Input should be a finite number"),
        "typo in model.tiny": (
            [str(hh_recipe(tmp_path, "hh")), "--set", "task.model.tiny.num_hiden_layers=2"],
            "task.model.tiny.num_hiden_layers: unknown key 'num_hiden_layers' for gpt_neox",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["non-UTF-8 recipe", "--set value not YAML", "missing tokenizer folder", "optimizer kwarg typo", "empty HH file",
     "empty IMDb file", "lr .inf", "typo in model.tiny"],
)  # fmt: skip
def test_each_bad_input_exits_2_with_one_message_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    if case in NEEDS_DATA:
        require_shared_data()
    arguments, expected = bad_inputs(tmp_path)[case]
    results = tmp_path / "results"
    assert main(["run", arguments[0], "--results", str(results), *arguments[1:]]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()) and "Traceback" not in err
    assert not results.exists()


def test_a_corrupt_or_locked_store_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from expo_bench import tracking

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "results"
    results.mkdir()
    store = results / "mlflow.db"
    store.write_bytes(b"this is not a database, just some bytes" * 100)
    before = snapshot(results)
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    assert main(["run", recipe, "--results", str(results)]) == EXIT_USER_ERROR
    assert "cannot be read as an SQLite database (file is not a database)" in " ".join(capsys.readouterr().err.split())
    assert snapshot(results) == before

    store.unlink()
    sqlite3.connect(store).execute("CREATE TABLE t (x)").connection.commit()
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    before = snapshot(results)
    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.5)
    try:
        assert main(["run", recipe, "--results", str(results)]) == EXIT_USER_ERROR
    finally:
        holder.close()
    assert "stayed locked by another process for 0.5 s" in " ".join(capsys.readouterr().err.split())
    assert "waiting for the tracking store" in caplog.text
    assert snapshot(results) == before


def test_a_read_only_results_folder_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import expo_bench.cli

    monkeypatch.setenv("COLUMNS", "300")
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: the folder refuses as a read-only one would

        def refused(dir: Path) -> None:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))

        monkeypatch.setattr(expo_bench.cli.tempfile, "TemporaryFile", refused)
    try:
        assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--results", str(results)]) == EXIT_USER_ERROR
    finally:
        results.chmod(0o755)
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot write results under {results / 'quickstart'}: {results}: Permission denied" in err
    assert "Traceback" not in err and not list(results.iterdir())


@pytest.mark.parametrize(
    ("link", "problem"), [("runs", "Too many levels of symbolic links"), ("nowhere", "a symbolic link to nothing")]
)
def test_results_behind_a_broken_symbolic_link_exit_2_with_one_message(tmp_path: Path, link: str, problem: str) -> None:
    (tmp_path / "runs").symlink_to(link)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "expo-bench"), "run", str(ROOT / "recipes" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr
    assert f"cannot write results under runs/quickstart: {tmp_path / 'runs'}" in result.stderr
    assert problem in result.stderr


def big_grid(tmp_path: Path, lams: int, smoothings: int) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    data["methods"] = [
        {
            "method": "dpo",
            "lam": [0.01 + i / lams for i in range(lams)],
            "grid": {"label_smoothing": [i / 1000 for i in range(smoothings)]},
        }
    ]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_huge_grid_states_its_size_and_needs_a_yes_to_start(tmp_path: Path) -> None:
    recipe = big_grid(tmp_path, 200, 100)
    command = [str(Path(sys.executable).parent / "expo-bench")]
    environment = {**os.environ, "COLUMNS": "300"}
    started = time.perf_counter()
    validated = subprocess.run([*command, "validate", str(recipe)], capture_output=True, text=True, env=environment)
    assert validated.returncode == 0 and "60,000 runs (20,000 configurations × 3 seeds)" in " ".join(validated.stdout.split())
    refused = subprocess.run([*command, "run", str(recipe)], capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert refused.returncode == EXIT_USER_ERROR and "Traceback" not in refused.stderr
    assert "60,000 runs is more than 10,000: start them? Pass --yes to start them" in " ".join(refused.stderr.split())
    assert not (tmp_path / "runs").exists() and time.perf_counter() - started < 60


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "starts"), [("y\n", True), ("\n", False), ("no\n", False)])
def test_on_a_terminal_a_huge_grid_is_asked_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], answer: str, starts: bool
) -> None:
    import expo_bench.cli
    import expo_bench.runner

    started: list[object] = []
    monkeypatch.setattr(expo_bench.runner, "run_experiment", lambda *args: started.append(args))
    monkeypatch.setattr(expo_bench.cli, "CONFIRM_RUNS", 5)
    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    status = main(["run", str(big_grid(tmp_path, 3, 2)), "--results", str(tmp_path / "results")])
    assert (status, bool(started)) == ((0, True) if starts else (EXIT_USER_ERROR, False))
    captured = capsys.readouterr()
    assert "18 runs is more than 5: start them? [y/N]" in captured.out
    assert starts or "not started: 18 runs" in captured.err


def fresh_modules(*args: str) -> set[str]:
    """The top-level packages a fresh ``expo-bench ARGS`` process has imported when it exits."""
    code = "\n".join(
        [
            "import sys, runpy",
            "sys.argv = ['expo-bench', *sys.argv[1:]]",
            "try:\n    runpy.run_module('expo_bench', run_name='__main__')",
            "except SystemExit:\n    pass",
            "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})), file=sys.stderr)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    return set(result.stderr.strip().splitlines()[-1].split())


def test_help_and_validate_import_no_heavy_package() -> None:
    """``--help`` needs none of the training stack, ``validate`` only torch: Lightning alone takes ~6 s to import."""
    heavy = {"lightning", "torchmetrics", "mlflow", "sklearn", "matplotlib", "datasets", "peft", "scipy"}
    assert fresh_modules("--help") & (heavy | {"torch", "transformers"}) == set()
    assert fresh_modules("recipes") & (heavy | {"torch", "transformers"}) == set()
    assert fresh_modules("methods") & heavy == set() and fresh_modules("schema", "task") & heavy == set()
    require_shared_data()
    assert fresh_modules("validate", "recipes/hh_tiny_local.yaml", "recipes/imdb_tiny_local.yaml") & heavy == set()


def test_a_method_instance_is_a_lightning_module_that_pickles() -> None:
    """Method classes are declared without Lightning; an instance is a LightningModule of its class all the same."""
    import pickle

    import lightning as L
    import torch

    from expo_bench.methods.dpo import DPO
    from expo_bench.optim import OptimizerConfig
    from expo_bench.tabular.policy import TabularPolicy

    pi_ref = torch.tensor([[0.5, 0.3, 0.2]])
    module = DPO(TabularPolicy(pi_ref), TabularPolicy(pi_ref), [DPO.Params()], OptimizerConfig())
    assert isinstance(module, DPO) and isinstance(module, L.LightningModule) and not issubclass(DPO, L.LightningModule)
    assert type(module) is DPO.Trainable and type(pickle.loads(pickle.dumps(module))) is DPO.Trainable


def test_methods_lists_every_builtin_with_its_lambda_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, method in available_methods().items():
        assert f"\n{name}: " in f"\n{out}"
        if method.regularization is not None:
            assert f"λ sets {method.regularization} (" in out
    assert "beta=0.1 (> 0)" in out and "label_smoothing=0.0 (≥ 0, < 0.5)" in out  # DPO's defaults and bounds
    assert "lam=0.1 (≥ 0, ≤ 1)" in out and "λ sets nothing (reference-free" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_recipes_lists_each_shipped_recipe_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(path.name for path in (ROOT / "recipes").glob("*.yaml"))
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == shipped
    assert any("Local twin of hh_pythia28.yaml" in line for line in lines)
    assert max(len(line) for line in lines) <= 80


def test_recipes_uses_a_wide_terminal_for_the_descriptions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    twin = next(line for line in lines if "hh_tiny_local.yaml" in line)
    assert twin.endswith("the real Pythia tokenizer and a tiny GPT-NeoX built from a config (no hub, no GPU)")


def test_schema_prints_sections_as_commented_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "train"]) == 0
    out = capsys.readouterr().out
    parsed = yaml.safe_load(out)["train"]
    assert parsed["max_epochs"] == 1 and parsed["optimizer"] == {"name": "Adam", "lr": 0.001, "warmup_steps": 0, "kwargs": {}}
    assert "# Linear warmup from 0 to ``lr``" in out
    assert main(["schema", "task"]) == 0
    kinds = capsys.readouterr().out
    assert all(f"#   {kind}: " in kinds for kind in ("tabular", "synthetic_tokens", "hh", "imdb", "preference"))
    assert main(["schema", "task.hh.evaluation.judge.llm"]) == 0
    llm = yaml.safe_load(capsys.readouterr().out)
    assert llm["task"]["evaluation"]["judge"]["kind"] == "llm"
    assert main(["schema", "task.hh.evaluaton"]) == EXIT_USER_ERROR
    assert "has no section 'evaluaton'" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["recipes/hh_tiny_local.yaml", "recipes/synthetic_tokens_tuned.yaml"])
def test_print_config_round_trips_to_the_same_recipe(
    path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the recipe's local paths are relative to the repository root
    if "../shared/data" in Path(path).read_text():
        require_shared_data()
    assert main(["validate", path, "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    if path.endswith("hh_tiny_local.yaml"):
        assert resolved["methods"][0]["params"] == {"gamma": 0.0, "length_normalize": False, "beta": 0.1, "label_smoothing": 0.0}
    else:  # a grid keeps what it sweeps, λ and the learning rate among them
        assert resolved["methods"][2]["grid"] == {"beta": [1.0, 3.0, 10.0, 30.0], "train.optimizer.lr": [0.0003, 0.001]}
        assert resolved["methods"][2]["train"] == {} and "beta" not in resolved["methods"][2]["params"]
    assert resolved["task"]["evaluation"]["bootstrap_resamples"] == 1000  # a default the recipe does not write
    again, original = validate_recipe(resolved, path), load_recipe(path)
    assert [run.grid for run in again.runs] == [run.grid for run in original.runs]
    assert [run.train for run in again.runs] == [run.train for run in original.runs]
    assert again.recipe.model_dump(exclude={"methods"}) == original.recipe.model_dump(exclude={"methods"})


def test_only_selects_methods_and_seeds(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    recipe = str(ROOT / "recipes/quickstart.yaml")
    assert main(["validate", recipe, "--only", "method=dpo", "--only", "seed=1,2", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seeds"] == [1, 2]
    assert [entry.get("label") or entry["method"] for entry in resolved["methods"]] == ["dpo", "dpo-margin"]
    assert main(["validate", recipe, "--only", "method=dpo-margin"]) == 0
    assert "dpo-margin" in capsys.readouterr().out
    assert main(["validate", recipe, "--only", "method=dpx", "--only", "seed=7", "--only", "lam=1"]) == EXIT_USER_ERROR
    assert "lam=1: expected KEY=VALUE with KEY one of method, seed" in capsys.readouterr().err
    assert main(["validate", recipe, "--only", "method=dpx", "--only", "seed=7"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no method entry is labelled or named dpx" in err and "no seed 7 in the recipe's seeds [0, 1, 2]" in err


@needs_shared_data()
def test_run_checks_the_judge_before_training_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from network import free_port

    recipe = str(ROOT / "recipes/hh_tiny_local.yaml")
    judge = f"task.evaluation.judge.base_url=http://127.0.0.1:{free_port()}/v1"
    shared = SHARED_DATA
    paths = [f"task.source={shared / 'hh-rlhf'}", f"task.tokenizer={shared / 'tokenizers' / 'gpt-neox-20b'}"]
    arguments = ["run", recipe, "--results", str(tmp_path), "--set", judge, *(f"--set={path}" for path in paths)]
    assert main(arguments) == EXIT_USER_ERROR
    err = " ".join(capsys.readouterr().err.split())
    assert "is not reachable" in err and "--set task.evaluation=null" in err
    assert not (tmp_path / "hh_tiny_local" / "runs").exists()  # nothing trained


def test_leaderboard_statistics_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leaderboard", "x", "--results", str(tmp_path), "--equivalence-fraction", "0"]) == EXIT_USER_ERROR
    assert "--equivalence-fraction: Input should be greater than 0" in " ".join(capsys.readouterr().err.split())
    assert not list(tmp_path.iterdir())

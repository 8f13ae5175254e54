"""The README's promises: its test command is what CI runs, and its add-a-method example (docs/methods.md) works."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from expo_bench.optim import OptimizerConfig
from expo_bench.tabular.data import TabularPairs, make_batch
from expo_bench.tabular.policy import TabularPolicy

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
METHODS_PAGE = (ROOT / "docs" / "methods.md").read_text()


def test_first_lines_give_the_main_job_and_test_commands() -> None:
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    main_job, tests = commands
    assert "expo-bench run recipes/" in main_job and "pytest" in tests
    assert tests in (ROOT / ".ci/run").read_text().splitlines()


def test_add_a_method_example_trains_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's method, in a package in the directory the user runs from, named in a recipe and trained by the
    real console script (which, unlike ``python -m``, does not put the working directory on the path)."""
    example = re.search(r"```python\n# my_package/my_module.py\n(.*?)```", METHODS_PAGE, re.S)
    assert example is not None
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_module.py").write_text(example.group(1))
    recipe = {
        "experiment": "hinge",
        "task": {
            "kind": "tabular",
            "prompts": [{"name": "x", "pi_star": [0.6, 0.3, 0.1], "pi_ref": [0.4, 0.4, 0.2]}],
            "draws_per_prompt": 30,
            "population": None,
        },
        "train": {"max_epochs": 5, "batch_size": 4, "optimizer": {"lr": 0.05}},
        "lam": [0.5, 5.0],
        "methods": [{"method": "my_package.my_module:Hinge", "label": "hinge"}],
    }
    (tmp_path / "hinge.yaml").write_text(yaml.safe_dump(recipe))
    script = shutil.which("expo-bench", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no expo-bench console script next to this Python (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # this checkout's code, whatever is installed
    result = subprocess.run([script, "run", "hinge.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MLflow database tables" not in result.stderr  # library chatter stays off the terminal
    runs = json.loads((tmp_path / "runs" / "hinge" / "summary.json").read_text())["runs"]  # a user's runs: runs/
    assert [run["params"]["beta"] for run in runs] == [0.5, 5.0]
    assert runs[0]["final_policy"]["x"] != pytest.approx([0.4, 0.4, 0.2], abs=1e-3)  # it trained

    # it honours the margin and soft labels: z·max(0, 1 - (s - γ)) + (1 - z)·max(0, 1 - (-s - γ)), s = βh
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_package.my_module import Hinge  # type: ignore[import-not-found]

    pi_ref = torch.tensor([[0.5, 0.3, 0.2]])
    policy = TabularPolicy(pi_ref)
    policy.logits.data = torch.tensor([[[0.0, -2.0, 1.0]]])
    module = Hinge(policy, TabularPolicy(pi_ref), [Hinge.Params(beta=2.0, gamma=0.5)], OptimizerConfig())
    pairs = TabularPairs(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([0.75]))
    batch = make_batch(pairs, torch.tensor([0]), pi_ref)
    h = 2.0 - (math.log(0.5) - math.log(0.3))
    expected = 0.75 * max(0.0, 1 - (2 * h - 0.5)) + 0.25 * max(0.0, 1 - (-2 * h - 0.5))
    assert module.objective(module.pair_logps(batch), batch)["loss"].item() == pytest.approx(expected, rel=1e-5)

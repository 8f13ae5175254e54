"""Language-model training on real HH pairs with a tiny GPT-NeoX and the real Pythia tokenizer (offline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import SHARED_DATA, needs_shared_data
from rich.console import Console
from torch.nn import functional as F

from expo_bench.errors import RecipeError
from expo_bench.lm.data import PairData, PairDataset, fingerprint_module, reference_logps
from expo_bench.lm.hh import load_hh_pairs
from expo_bench.lm.model import CausalLMScorer, ModelConfig, response_logps
from expo_bench.lm.sft import SupervisedFineTuning
from expo_bench.lm.tokenize import TokenizationConfig, collate_pairs, tokenize_pair
from expo_bench.methods import available_methods
from expo_bench.optim import OptimizerConfig
from expo_bench.recipe import load_recipe, validate_recipe
from expo_bench.runner import run_experiment
from expo_bench.train_config import TrainConfig
from expo_bench.trainer import build_trainer

ROOT = Path(__file__).parent.parent
SHARED = SHARED_DATA
pytestmark = needs_shared_data()
TINY = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt-neox-20b")


@pytest.fixture(scope="module")
def pairs(tokenizer: Any) -> list[Any]:
    prompts, _ = load_hh_pairs(str(SHARED / "hh-rlhf"), "helpful-base", "test")
    config = TokenizationConfig(max_length=48, max_prompt_length=32)
    return [tokenize_pair(tokenizer, pair, config) for pair in prompts[:24]]


def tiny_model(tokenizer: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return ModelConfig(tiny=TINY).build(vocab_size=len(tokenizer))


def test_response_logps_score_exactly_the_response_tokens(tokenizer: Any, pairs: list[Any]) -> None:
    batch = collate_pairs(pairs[:3], tokenizer.eos_token_id)
    logits = torch.randn(*batch.chosen["input_ids"].shape, 11)
    ids = batch.chosen["input_ids"] % 11
    mask = batch.chosen["loss_mask"]
    expected = torch.zeros(3)
    for row in range(3):
        for t in range(1, ids.shape[1]):
            if mask[row, t]:
                expected[row] += F.log_softmax(logits[row, t - 1], -1)[ids[row, t]]
    torch.testing.assert_close(response_logps(logits, ids, mask), expected)


def test_cached_reference_logps_equal_fresh_ones(tokenizer: Any, pairs: list[Any]) -> None:
    reference = CausalLMScorer(tiny_model(tokenizer)).eval()
    dataset = PairDataset(pairs, tokenizer.eos_token_id)
    cached = reference_logps(reference, dataset, batch_size=5, device=torch.device("cpu"))
    dataset.reference_logps = cached
    batch = dataset.__getitems__([3, 0, 7])
    with torch.no_grad():
        fresh = reference.sequence_logps(batch.chosen), reference.sequence_logps(batch.rejected)
    assert batch.reference_chosen_logps is not None and batch.reference_rejected_logps is not None
    torch.testing.assert_close(batch.reference_chosen_logps, fresh[0])
    torch.testing.assert_close(batch.reference_rejected_logps, fresh[1])


HEAVY = {"dpo_kl", "expo_compositional"}
"""Methods that score KL samples every step (a minute or more here): deselected by default, ``pytest -m slow`` runs them;
the FSDP test and the headline rehearsal train EXPO-compositional by default."""


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name in HEAVY else []) for name in sorted(available_methods())]
)
def test_every_method_trains_and_its_loss_falls(name: str, tokenizer: Any, pairs: list[Any]) -> None:
    """Every built-in method with its default hyperparameters, on batches that carry reference samples too."""
    method = available_methods()[name]
    base = tiny_model(tokenizer)
    samples = [[[11, 12, tokenizer.eos_token_id], [13, tokenizer.eos_token_id]] for _ in pairs]
    train = PairDataset(pairs, tokenizer.eos_token_id, reference_samples=samples)
    train.reference_logps = reference_logps(CausalLMScorer(base).eval(), train, 8, torch.device("cpu"))
    reference = None if method.reference_free else CausalLMScorer(copy.deepcopy(base))
    module = method(CausalLMScorer(copy.deepcopy(base)), reference, [method.Params()], OptimizerConfig(lr=1e-3))
    batch = train.__getitems__(list(range(len(pairs))))

    def loss() -> float:
        with torch.no_grad():
            return float(sum(module.objective(module.pair_logps(batch), batch).values()))

    before = loss()
    L.seed_everything(0, verbose=False)
    config = TrainConfig(max_epochs=4, batch_size=8, accelerator="cpu", log_every_n_steps=1)
    build_trainer(config, []).fit(module, datamodule=PairData(train, train, 8, seed=0))
    assert loss() < before - 0.01


def test_sft_lowers_the_nll_of_chosen_responses(tokenizer: Any, pairs: list[Any]) -> None:
    module = SupervisedFineTuning(CausalLMScorer(tiny_model(tokenizer)), OptimizerConfig(lr=3e-3))
    batch = collate_pairs(pairs, tokenizer.eos_token_id)
    before = float(module.nll(batch))
    data = PairData(PairDataset(pairs, tokenizer.eos_token_id), PairDataset(pairs, tokenizer.eos_token_id), 8, seed=0)
    build_trainer(TrainConfig(max_epochs=3, batch_size=8, accelerator="cpu"), []).fit(module, datamodule=data)
    assert float(module.nll(batch)) < before - 0.5


def test_module_fingerprint_follows_the_weights(tokenizer: Any) -> None:
    first, same, other = tiny_model(tokenizer, 0), tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    assert fingerprint_module(first) == fingerprint_module(same) != fingerprint_module(other)


def local_twin(**changes: Any) -> dict[str, Any]:
    """The HH twin without its evaluation (that needs a judge server: tests/test_evaluation.py starts one)."""
    data = yaml.safe_load((ROOT / "recipes" / "hh_tiny_local.yaml").read_text())
    data["task"] |= {"source": str(SHARED / "hh-rlhf"), "tokenizer": str(SHARED / "tokenizers" / "gpt-neox-20b")}
    del data["task"]["evaluation"]
    data.update(changes)
    return data


@pytest.mark.slow  # about a minute; the default suite runs the HH pipeline in the headline rehearsal and the FSDP test
def test_local_twin_runs_end_to_end(tmp_path: Path) -> None:
    data = local_twin()
    data["task"] |= {"max_train_pairs": 32, "max_eval_pairs": 16}
    out = run_experiment(validate_recipe(data, "hh_tiny_local.yaml"), tmp_path, Console(quiet=True))
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [run["method"] for run in runs] == [entry.get("label", entry["method"]) for entry in data["methods"]]
    for run in runs:
        assert run["train_pairs"] == 32 and run["eval_pairs"] == 16 and run["steps"] == 4
        assert run["sft_val_nll_after"] < run["sft_val_nll_before"]
        assert len(run["data_fingerprint"]) == len(run["reference_fingerprint"]) == 16
        assert 0.0 <= run["eval_after"]["val/preference_accuracy"] <= 1.0
    assert "expo_compositional_margin" in (out / "methods.md").read_text()
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_reference_samples_estimator_is_refused_where_the_task_has_none() -> None:
    data = local_twin()
    del data["task"]["reference_samples"]
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data, "hh.yaml")
    assert [path for path, _ in caught.value.problems] == ["methods[3]", "methods[5]"]
    assert all("set task.reference_samples" in message for _, message in caught.value.problems)


def test_missing_local_source_names_the_field(tmp_path: Path) -> None:
    data = local_twin()
    data["task"]["source"] = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data, "hh.yaml")
    [(path, message)] = caught.value.problems
    assert path == "task" and "neither an existing file or folder" in message


def test_hub_recipe_validates_without_the_hub() -> None:
    experiment = load_recipe(ROOT / "recipes" / "hh_pythia28.yaml")
    assert experiment.recipe.task.kind == "hh" and len(experiment.runs) == 6


def test_adapter_disabled_reference_is_the_untrained_base(tokenizer: Any, pairs: list[Any]) -> None:
    from expo_bench.lm.model import AdapterDisabledScorer, LoraSettings
    from expo_bench.methods.dpo import DPO

    base = tiny_model(tokenizer)
    frozen = CausalLMScorer(copy.deepcopy(base)).eval()
    policy = LoraSettings(r=4, target_modules=["query_key_value", "dense"]).wrap(copy.deepcopy(base))
    module = DPO(CausalLMScorer(policy), AdapterDisabledScorer(policy), [DPO.Params(beta=0.5)], OptimizerConfig(lr=1e-2))
    train = PairDataset(pairs, tokenizer.eos_token_id)
    build_trainer(TrainConfig(max_epochs=2, batch_size=8, accelerator="cpu"), []).fit(
        module, datamodule=PairData(train, train, 8, 0)
    )
    batch = train.__getitems__([0, 1, 2, 3])
    module.eval()
    with torch.no_grad():
        trained = module.policy.sequence_logps(batch.chosen)
        reference = module.reference.sequence_logps(batch.chosen)  # type: ignore[union-attr]
    torch.testing.assert_close(reference, frozen.sequence_logps(batch.chosen))
    assert (trained - reference).abs().max() > 1e-3  # the adapter did train
    assert module.policy.training is False and all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)


def test_cached_frozen_copy_and_lora_references_run_end_to_end(tmp_path: Path) -> None:
    def run(**task: Any) -> dict[str, Any]:
        # EXPO on reference samples: the cache covers pair and sample log-probs alike
        data = local_twin(methods=[{"method": "expo_compositional", "params": {"lam": 0.1}}])
        data["task"] |= {"max_train_pairs": 16, "max_eval_pairs": 8, "sft": None, **task}
        out = run_experiment(validate_recipe(data, "hh.yaml"), tmp_path / str(len(list(tmp_path.iterdir()))), Console(quiet=True))
        return json.loads((out / "summary.json").read_text())["runs"][0]

    cached, fresh = run(reference="cached"), run(reference="frozen_copy")
    assert cached["eval_after"] == pytest.approx(fresh["eval_after"], abs=1e-5)  # the cache changes nothing but cost
    lora = run(reference="adapter_disabled", lora={"r": 4, "target_modules": ["query_key_value"]})
    assert lora["eval_before"] == pytest.approx(fresh["eval_before"], abs=1e-5)  # same start: LoRA's B is zero
    assert lora["eval_after"] != pytest.approx(fresh["eval_after"], abs=1e-5)


def test_adapter_disabled_reference_needs_lora() -> None:
    data = local_twin()
    data["task"]["reference"] = "adapter_disabled"
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data, "hh.yaml")
    assert caught.value.problems == [("task", "Value error, reference 'adapter_disabled' needs a LoRA policy: add lora: {r: 16}")]


def test_reference_samples_are_seeded_and_end_at_eos(tokenizer: Any, pairs: list[Any]) -> None:
    from expo_bench.lm.sampling import SamplingConfig, sample_responses

    model = tiny_model(tokenizer)
    config = SamplingConfig(samples_per_prompt=3, max_new_tokens=6, batch_size=4)
    prompts = [pair.prompt_ids for pair in pairs[:5]]
    state = torch.random.get_rng_state()
    first = sample_responses(model, prompts, config, tokenizer.eos_token_id, tokenizer.eos_token_id, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is untouched
    assert first == sample_responses(model, prompts, config, tokenizer.eos_token_id, tokenizer.eos_token_id, seed=1)
    assert first != sample_responses(model, prompts, config, tokenizer.eos_token_id, tokenizer.eos_token_id, seed=2)
    assert [len(responses) for responses in first] == [3] * 5
    for response in (r for responses in first for r in responses):
        assert 1 <= len(response) <= 6 and (len(response) == 6 or response[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in response[:-1]


def test_expo_kl_on_reference_samples_matches_a_direct_estimate(tokenizer: Any, pairs: list[Any]) -> None:
    from expo_bench.methods.expo_compositional import EXPOCompositional

    base, policy = tiny_model(tokenizer, 0), tiny_model(tokenizer, 1)
    samples = [[[11, 12, tokenizer.eos_token_id]], [[13, tokenizer.eos_token_id]]] * 2
    dataset = PairDataset(pairs[:4], tokenizer.eos_token_id, reference_samples=samples)
    batch = dataset.__getitems__([0, 1, 2, 3])
    assert batch.kl_samples is not None and batch.kl_weights is not None
    assert batch.kl_samples["loss_mask"].sum(1).tolist() == [3, 2, 3, 2]
    params = [EXPOCompositional.Params(lam=2.0, kl_scale=0.5)]
    module = EXPOCompositional(CausalLMScorer(policy), CausalLMScorer(base), params, OptimizerConfig())
    terms = module.objective(module.pair_logps(batch), batch)
    with torch.no_grad():
        direct = [
            CausalLMScorer(base).sequence_logps(batch.kl_samples)[i] - CausalLMScorer(policy).sequence_logps(batch.kl_samples)[i]
            for i in range(4)
        ]
    assert float(terms["kl"]) == pytest.approx(2.0 * 0.5 * sum(float(d) for d in direct) / 4, rel=1e-5)


def test_a_second_run_reuses_cached_reference_work(tmp_path: Path) -> None:
    data = local_twin(methods=[{"method": "expo_compositional", "params": {"lam": 0.1}}])
    data["task"] |= {"max_train_pairs": 8, "max_eval_pairs": 4, "sft": None}
    experiment = validate_recipe(data, "hh.yaml")
    first = Console(record=True, width=200)
    out = run_experiment(experiment, tmp_path, first)
    before = json.loads((out / "summary.json").read_text())["runs"][0]["eval_after"]
    cache = sorted(path.name.split("-")[:2] for path in (tmp_path / "hh_tiny_local" / "cache").glob("[!.]*"))  # not locks
    assert cache == [["reference", "logps"], ["reference", "samples"]]
    second = Console(record=True, width=200)
    run_experiment(experiment, tmp_path, second)
    first_log, second_log = first.export_text(), second.export_text()
    assert "computed once" in first_log and "drawn once" in first_log
    assert "from the cache" in second_log and "drawn once" not in second_log and "computed once" not in second_log
    after = json.loads((out / "summary.json").read_text())["runs"][0]["eval_after"]
    assert after == before and after["val/loss_kl"] != 0


class Interrupted(Exception):
    """Stands for a machine lost mid-run."""


def test_an_interrupted_run_resumes_and_a_finished_one_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from expo_bench.trainer import LossHistory

    data = local_twin(methods=[{"method": "dpo", "params": {"beta": 0.1}}])
    data["task"] |= {"max_train_pairs": 16, "max_eval_pairs": 8, "sft": None}
    data["train"] |= {"max_epochs": 3}
    experiment = validate_recipe(data, "hh.yaml")

    def summary(root: Path, console: Console | None = None) -> dict[str, Any]:
        out = run_experiment(experiment, root, console or Console(quiet=True))
        return dict(json.loads((out / "summary.json").read_text())["runs"][0])

    uninterrupted = summary(tmp_path / "whole")

    def fail_in_second_epoch(self: LossHistory, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(LossHistory, "on_train_epoch_start", fail_in_second_epoch, raising=False)
        with pytest.raises(Interrupted):
            summary(tmp_path / "broken")
    [run_dir] = (tmp_path / "broken" / "hh_tiny_local" / "runs").glob("dpo-*")  # beside it: its lock
    assert (run_dir / "last.ckpt").exists() and not (run_dir / "record.json").exists()

    log = Console(record=True, width=200)
    resumed = summary(tmp_path / "broken", log)
    assert "resuming from" in log.export_text()
    assert resumed["steps"] == uninterrupted["steps"] == 3 * 2
    assert resumed["eval_after"] == pytest.approx(uninterrupted["eval_after"], abs=1e-6)
    # the loss history before the interruption came back from the checkpoint
    assert [step for step, _ in resumed["loss_history"]] == [step for step, _ in uninterrupted["loss_history"]] == [2, 4, 6]
    assert [loss for _, loss in resumed["loss_history"]] == pytest.approx([loss for _, loss in uninterrupted["loss_history"]])

    again = Console(record=True, width=200)
    assert summary(tmp_path / "broken", again)["eval_after"] == resumed["eval_after"]
    assert "finished in an earlier run" in again.export_text()


def test_response_entropy_of_a_uniform_model_is_log_vocabulary(tokenizer: Any, pairs: list[Any]) -> None:
    import math

    model = tiny_model(tokenizer)
    torch.nn.init.zeros_(model.get_output_embeddings().weight)  # every next-token distribution is uniform
    batch = collate_pairs(pairs[:4], tokenizer.eos_token_id)
    entropy = CausalLMScorer(model).response_entropy(batch.chosen)
    torch.testing.assert_close(entropy, torch.full((4,), math.log(model.config.vocab_size)))


def test_redrawn_reference_samples_change_with_the_epoch(tokenizer: Any, pairs: list[Any]) -> None:
    from expo_bench.lm.data import loader

    eos = tokenizer.eos_token_id
    samples = [[[11, eos], [12, eos], [13, eos]] for _ in range(4)]
    dataset = PairDataset(pairs[:4], eos, reference_samples=samples, reference_sample_logps=[[-1.0, -2.0, -3.0]] * 4)
    dataset.samples_per_epoch = 1
    for epoch, token in [(0, 11), (1, 12), (2, 13), (3, 11)]:  # epoch e uses draw e, cycling
        batches = loader(dataset, 4, shuffle=True, seed=0)
        batches.batch_sampler.sampler.set_epoch(epoch)  # type: ignore[union-attr]  # what Lightning calls at every epoch start
        batch = next(iter(batches)).contents  # sealed against precision casts
        assert batch.kl_samples is not None and batch.kl_reference_logps is not None
        first_tokens = batch.kl_samples["input_ids"][batch.kl_samples["loss_mask"]].view(4, 2)[:, 0]
        assert first_tokens.tolist() == [token] * 4
        assert batch.kl_reference_logps.tolist() == [-(token - 10.0)] * 4

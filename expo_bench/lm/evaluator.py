"""Evaluation of a trained policy: sample held-out prompts at each temperature, judge every sample against a
baseline response, and measure win rate, diversity, reward and KL(π‖π_ref) (the DPO paper's protocols).

Samples and verdicts are written as jsonl next to the run, so judging can be redone without sampling again.
Across ranks, sampling and scoring are sharded (every rank its slices of the prompts, gathered in order), while
judging, metrics and files belong to rank zero, whose results every rank receives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from expo_bench import cache, metric_keys
from expo_bench.cache import atomic_write, cached, digest, read_json
from expo_bench.config_model import ConfigModel, closest
from expo_bench.distributed import broadcast, is_global_zero, map_sharded, on_rank_zero
from expo_bench.evaluation.judges import JudgeConfig
from expo_bench.evaluation.types import Comparison, Judge, Verdict
from expo_bench.lm.model import evaluating, on_accelerator, response_logps
from expo_bench.lm.sampling import SamplingConfig, sample_responses
from expo_bench.lm.tokenize import pad_token_id, padded_sequences
from expo_bench.reporting import progress

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ExactMetrics = Callable[["PreTrainedModel", Sequence[list[int]]], dict[str, float]]
"""Metrics a task can compute exactly from a policy's weights on the given prompts (the synthetic task's distance to
π*), as evaluation metric keys."""


class SelectionConfig(ConfigModel):
    """Evaluation prompts set aside to pick each method's configuration, so that the prompts a leaderboard reports on
    never chose what is reported (a configuration picked on the reported metric itself is optimistic). They are held
    out from training where the task holds prompts out (HH, IMDb, preference data); the synthetic-token task holds out
    responses, not prompts: its selection prompts are training prompts too."""

    prompts: int = Field(gt=0)
    """The first this many evaluation prompts; the leaderboard reports on the others."""
    metric: str | None = None
    """The evaluation metric (a name after ``eval/``, e.g. ``win_rate``) computed on them that picks; default: the
    task's rank metric."""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str | None) -> str | None:
        names = sorted(m.name for m in metric_keys.CATALOG.values() if m.key.startswith(f"{metric_keys.EVAL}/") and m.directed)
        if metric is not None and metric not in names:
            raise ValueError(f"unknown evaluation metric {metric!r}{closest(metric, names)}; known: {', '.join(names)}")
        return metric


class EvaluationConfig(ConfigModel):
    """Sample each trained policy on held-out prompts and judge the samples (DPO paper, §6)."""

    temperatures: list[float] = Field([1.0], min_length=1)
    """Sampling temperatures; the DPO paper's HH evaluation used 0.25, 0.5, 0.75 and 1.0."""
    leaderboard_temperature: float | None = None
    """The temperature whose metrics the leaderboard shows (default: the first)."""
    samples_per_prompt: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; 1 keeps the whole distribution."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens; 0 keeps them all. The KL estimate scores samples under the whole tempered
    policy, so it is an unbiased estimate of KL(π_T‖π_ref) only with top_p = 1 and top_k = 0."""
    prompts: int | None = Field(None, gt=0)
    """Report on this many evaluation prompts (all the rest when unset), after those set aside for selection."""
    selection: SelectionConfig | None = None
    """Evaluation prompts that pick each method's configuration and are never reported on (unset: the leaderboard picks
    on the reported metric itself, and says so)."""
    batch_size: int = Field(16, ge=1)
    baseline: Literal["reference", "chosen"] = "reference"
    """What each sample is judged against: the reference (SFT) model's sample for the same prompt at the
    same temperature, or the held-out pair's chosen response (the DPO paper's HH win rate)."""
    judge: JudgeConfig | None = None
    """The judge; unset: the task's own ground truth (the IMDb reward model, the synthetic oracle)."""
    judges: list[JudgeConfig] | None = Field(None, min_length=2)
    """Several judges of the same comparisons, instead of ``judge``: the first one's verdicts are the win rate; each
    other's win rate (``eval/j2/win_rate``, ...) and every pair's agreement and Cohen's κ (``eval/j1_j2/kappa``)
    are reported beside it."""
    calibrate: bool = False
    """Also judge every comparison by the task's own ground truth (the synthetic oracle, IMDb's reward model) and
    report each judge's agreement with it (``eval/j1_truth/kappa``); the reward then comes from the ground truth."""
    bootstrap_resamples: int = Field(1000, ge=1)
    every_n_steps: int | None = Field(None, gt=0)
    """Also evaluate during training every this many optimizer steps, at the leaderboard temperature."""
    evaluate_only: bool = False
    """Evaluate the checkpoints of finished runs without training anything: a run that has not finished is an error."""
    added_later: ClassVar[frozenset[str]] = frozenset({"judges", "calibrate"})

    @model_validator(mode="after")
    def _leaderboard_temperature_sampled(self) -> EvaluationConfig:
        if self.leaderboard_temperature is not None and self.leaderboard_temperature not in self.temperatures:
            raise ValueError(
                f"leaderboard_temperature {self.leaderboard_temperature} is not among temperatures {self.temperatures}"
            )
        if self.judge is not None and self.judges is not None:
            raise ValueError("set judge (one) or judges (several), not both")
        return self

    @property
    def panel(self) -> list[JudgeConfig]:
        """The judges the recipe names, the first one's verdicts being the win rate (none: the task's own)."""
        return self.judges or ([] if self.judge is None else [self.judge])

    @property
    def headline_temperature(self) -> float:
        return self.temperatures[0] if self.leaderboard_temperature is None else self.leaderboard_temperature

    def sampling(self, temperature: float) -> SamplingConfig:
        return SamplingConfig(
            samples_per_prompt=self.samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class HeldOutPrompts:
    """The evaluation prompts of one seed, with the dataset's chosen response to each (without its EOS)."""

    prompt_ids: list[list[int]]
    prompts: list[str]
    chosen_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def cut(self, start: int, stop: int | None) -> HeldOutPrompts:
        """The prompts ``start`` to ``stop`` (exclusive; None: to the end)."""
        return HeldOutPrompts(self.prompt_ids[start:stop], self.prompts[start:stop], self.chosen_ids[start:stop])


class Evaluator:
    """Evaluates policies of one seed against one baseline on the reported (test) prompts and, where the config sets
    some aside, on the selection prompts; the reference's samples are drawn once and cached."""

    def __init__(
        self,
        config: EvaluationConfig,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        held_out: HeldOutPrompts,
        judges: Sequence[Judge],
        seed: int,
        cache_dir: Path,
        exact: ExactMetrics | None = None,
        selection: HeldOutPrompts | None = None,
        truth: Judge | None = None,
    ) -> None:
        self.config, self.tokenizer, self.reference, self.held_out = config, tokenizer, reference, held_out
        self.seed, self.cache_dir, self.exact, self.selection = seed, cache_dir, exact, selection
        self.judges: dict[str, Judge] = {metric_keys.judge_label(index): judge for index, judge in enumerate(judges)}
        """Every judge by label, the first one's verdicts being the win rate, then the ground truth when it calibrates."""
        if truth is not None:
            self.judges[metric_keys.TRUTH] = truth
        self.pad = pad_token_id(tokenizer)
        self._baselines: dict[tuple[str, float], list[list[list[int]]]] = {}

    def _sample(
        self, model: PreTrainedModel, prompts: HeldOutPrompts, temperature: float, what: str, console: Console | None
    ) -> list[list[list[int]]]:
        sampling, eos = self.config.sampling(temperature), self.tokenizer.eos_token_id
        with progress(console, f"sampling {what} at T={temperature:g} (prompts)", len(prompts.prompt_ids)) as done:
            return sample_responses(model, prompts.prompt_ids, sampling, self.pad, eos, self.seed, done)

    def _baselines_for(
        self, prompts: HeldOutPrompts, stage: str, temperature: float, console: Console | None
    ) -> list[list[list[int]]]:
        if self.config.baseline == "chosen":
            return [[ids] * self.config.samples_per_prompt for ids in prompts.chosen_ids]
        if (stage, temperature) not in self._baselines:
            from expo_bench.lm.data import fingerprint_module  # Lightning: not needed to validate a recipe

            key = {
                "reference": fingerprint_module(self.reference),
                "prompts": prompts.prompt_ids,
                "sampling": self.config.sampling(temperature).model_dump(),
                "seed": self.seed,
            }
            self._baselines[stage, temperature], _ = cached(
                self.cache_dir,
                "baseline-samples",
                key,
                lambda: self._sample(self.reference, prompts, temperature, "the reference", console),
            )
        return self._baselines[stage, temperature]

    def _text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def results_dir(self, run_dir: Path) -> Path:
        """Where this evaluation (config and judge) of a run keeps its samples, verdicts and metrics."""
        return run_dir / f"evaluation-{self.key()}"

    def samples_path(self, run_dir: Path) -> Path:
        """Where a run's samples on the reported prompts at the leaderboard temperature are."""
        return self.results_dir(run_dir) / f"T{self.config.headline_temperature:g}" / "samples.jsonl"

    @property
    def judge(self) -> Judge:
        """The judge whose verdicts are the win rate."""
        return next(iter(self.judges.values()))

    @property
    def judge_names(self) -> str:
        """The judge's name; with several, each as ``label=name``."""
        if len(self.judges) == 1:
            return self.judge.name
        return ", ".join(f"{label}={judge.name}" for label, judge in self.judges.items())

    def key(self) -> str:
        """A digest of what makes two evaluations of one policy differ: the config (every judge in it) and the judge, or
        every judge where the task brings several of its own."""
        task_judges = {} if self.config.panel or len(self.judges) == 1 else {"task_judges": self.judge_names}
        return digest({"evaluation": self.config.model_dump(mode="json"), "judge": self.judge.name} | task_judges)

    def has_result(self, run_dir: Path) -> bool:
        """Whether the run's metrics under this evaluation are stored (rank zero's answer, on every rank)."""
        return broadcast((self.results_dir(run_dir) / "metrics.json").exists())

    def evaluate_once(
        self, policy: PreTrainedModel | None, run_dir: Path, provenance: dict[str, Any], console: Console | None = None
    ) -> tuple[dict[str, float], bool]:
        """The run's metrics under this evaluation, computed at most once (``policy`` may be None then); with a
        ``console``, sampling and judging show their progress."""
        out_dir = self.results_dir(run_dir)
        done = out_dir / "metrics.json"
        if self.has_result(run_dir):
            return on_rank_zero(lambda: _stored_metrics(done)), True
        assert policy is not None, "a run without stored metrics needs its policy"
        metrics = self.evaluate(policy, out_dir, provenance, with_selection=True, console=console)
        if is_global_zero():
            cache.sealed_write(done, json.dumps(metrics, indent=2))  # written last: its presence means it finished
        return metrics, False

    def evaluate(
        self,
        policy: PreTrainedModel,
        out_dir: Path,
        provenance: dict[str, Any],
        temperatures: Sequence[float] | None = None,
        with_selection: bool = False,
        console: Console | None = None,
    ) -> dict[str, float]:
        """Metrics of ``policy`` on the reported prompts at every temperature (keys ``eval/T<t>/...``) and, unprefixed,
        at the leaderboard temperature; samples and verdicts go to ``out_dir/T<t>/{samples,judgments}.jsonl``. With
        ``with_selection``, also the ``selection/...`` metrics on the selection prompts at the leaderboard temperature
        (in ``out_dir/selection-T<t>/``)."""
        metrics: dict[str, float] = {}
        with on_accelerator(policy, self.reference):
            for temperature in temperatures or self.config.temperatures:
                where = out_dir / f"T{temperature:g}"
                results = self._evaluate_at(policy, self.held_out, "test", temperature, where, provenance, console)
                metrics |= {metric_keys.at_temperature(key, temperature): value for key, value in results.items()}
                if temperature == self.config.headline_temperature:
                    metrics |= results
            if self.exact is not None:
                metrics |= self.exact(policy, self.held_out.prompt_ids)
            if with_selection and self.selection is not None:
                temperature = self.config.headline_temperature
                where = out_dir / f"selection-T{temperature:g}"
                chosen = self._evaluate_at(policy, self.selection, "selection", temperature, where, provenance, console)
                if self.exact is not None:
                    chosen |= self.exact(policy, self.selection.prompt_ids)
                metrics |= {metric_keys.selection_key(key): value for key, value in chosen.items()}
        return metrics

    def _evaluate_at(
        self,
        policy: PreTrainedModel,
        held_out: HeldOutPrompts,
        stage: str,
        temperature: float,
        out_dir: Path,
        provenance: dict[str, Any],
        console: Console | None,
    ) -> dict[str, float]:
        from expo_bench.evaluation.metrics import SAMPLE_METRICS, EvaluatedSamples, RewardKL  # not needed to validate

        samples = self._sample(policy, held_out, temperature, str(provenance.get("method", "the policy")), console)
        baselines = self._baselines_for(held_out, stage, temperature, console)
        prompts = []
        comparisons, lengths = [], []
        eos = self.tokenizer.eos_token_id
        for index, (group, baseline_group) in enumerate(zip(samples, baselines, strict=True)):
            for sample, baseline in zip(group, baseline_group, strict=True):
                prompts.append(index)
                comparisons.append(Comparison(held_out.prompts[index], self._text(sample), self._text(baseline)))
                # lengths in the same units: a policy sample keeps its EOS, a chosen response has none
                lengths.append(len(strip_eos(sample, eos)) - len(strip_eos(baseline, eos)))
        # one request per comparison and judge, whatever the world
        panel = on_rank_zero(lambda: {label: self._judge(judge, comparisons, console) for label, judge in self.judges.items()})
        # every rank holds every verdict and sample here: the metrics must not gather them again across ranks
        flat = [sample for group in samples for sample in group]
        prompt_ids = [held_out.prompt_ids[index] for index in prompts]
        policy_logps = sequence_logps(policy, prompt_ids, flat, self.pad, self.config.batch_size, temperature)
        reference_logps = sequence_logps(self.reference, prompt_ids, flat, self.pad, self.config.batch_size)
        rewards = {
            label: torch.tensor(
                [math.nan if verdict.candidate_reward is None else verdict.candidate_reward for verdict in panel[label]],
                dtype=torch.float64,
            )
            for label, judge in self.judges.items()
            if judge.gives_rewards
        }
        evaluated = EvaluatedSamples(
            samples=[[strip_eos(sample, eos) for sample in group] for group in samples],
            outcomes=torch.tensor([verdict.outcome for verdict in next(iter(panel.values()))]),
            length_difference=torch.tensor(lengths, dtype=torch.float64),
            clusters=torch.tensor(prompts),  # a prompt's samples are resampled together
            rewards=next(iter(rewards.values()), None),  # the first rewarding judge's reward is the reward
            policy_logps=policy_logps,
            reference_logps=reference_logps,
            resamples=self.config.bootstrap_resamples,
        )
        results: dict[str, float] = {}
        for registered in SAMPLE_METRICS.values():
            results |= scalars(registered.compute(evaluated))
        for label, scored in list(rewards.items())[1:]:  # the other rewarding judges' rewards beside it
            reward_kl = RewardKL(sync_on_compute=False)
            reward_kl.update(scored, policy_logps, reference_logps)
            summary = reward_kl.compute()
            results |= scalars({f"{label}/{name}": summary[name] for name in ("reward", "reward_stderr")})
        results |= scalars(panel_metrics(panel, evaluated.length_difference, evaluated.clusters, evaluated.resamples))
        if is_global_zero():
            common = {**provenance, "seed": self.seed, "temperature": temperature}
            first_reward = None if evaluated.rewards is None else evaluated.rewards.tolist()
            self._write(out_dir, common, prompts, comparisons, panel, first_reward)
        return results

    def _write(
        self,
        out_dir: Path,
        common: dict[str, Any],
        prompts: list[int],
        comparisons: list[Comparison],
        panel: Mapping[str, list[Verdict]],
        rewards: list[float] | None,
    ) -> None:
        """``samples.jsonl`` and the verdicts of one temperature: the first judge's in ``judgments.jsonl``, each
        other's in ``judgments-<label>.jsonl``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(
            out_dir / "samples.jsonl",
            [
                {**common, "prompt_index": index, "prompt": comparison.prompt, "response": comparison.candidate}
                | ({} if rewards is None else {"reward": rewards[row]})
                for row, (index, comparison) in enumerate(zip(prompts, comparisons, strict=True))
            ],
        )
        for position, (label, verdicts) in enumerate(panel.items()):
            write_jsonl(
                out_dir / ("judgments.jsonl" if position == 0 else f"judgments-{label}.jsonl"),
                [
                    {
                        **common,
                        "judge": self.judges[label].name,
                        "prompt_index": index,
                        "prompt": comparison.prompt,
                        "candidate": comparison.candidate,
                        "baseline": comparison.baseline,
                        "outcome": verdict.outcome,
                        **verdict.detail,
                    }
                    for index, comparison, verdict in zip(prompts, comparisons, verdicts, strict=True)
                ],
            )

    @staticmethod
    def _judge(judge: Judge, comparisons: list[Comparison], console: Console | None) -> list[Verdict]:
        """The judge's verdicts, with the comparisons settled shown as they arrive."""
        with progress(console, f"judging with {judge.name} (comparisons)", len(comparisons)) as done:
            return judge.judge(comparisons, done)


def panel_metrics(
    panel: Mapping[str, list[Verdict]], length_difference: torch.Tensor, clusters: torch.Tensor, resamples: int
) -> dict[str, float]:
    """What the judges say about themselves (names after ``eval/``): each judge's position bias and self-consistency
    on the comparisons it judged both ways (the first judge's unprefixed, the others' under their label, with their
    win rates); every pair's agreement and Cohen's κ under ``<label>_<label>/``. Every resample draws whole
    ``clusters`` (prompts)."""
    from expo_bench.evaluation.metrics import agreement_summary, position_bias_summary, win_rate_summary

    outcomes = {label: torch.tensor([verdict.outcome for verdict in verdicts]) for label, verdicts in panel.items()}
    results: dict[str, float] = {}
    for position, (label, verdicts) in enumerate(panel.items()):
        prefix = "" if position == 0 else f"{label}/"
        summary: dict[str, float] = {}
        if position:
            summary |= win_rate_summary(outcomes[label], length_difference, resamples=resamples, clusters=clusters)
        both = [(row, verdict.orders) for row, verdict in enumerate(verdicts) if verdict.orders is not None]
        if both:
            rows = torch.tensor([row for row, _ in both])
            first, second = (torch.tensor([orders[side] for _, orders in both]) for side in (0, 1))
            summary |= position_bias_summary(first, second, clusters=clusters[rows], resamples=resamples)
        results |= {prefix + name: value for name, value in summary.items()}
    for first_label, second_label in combinations(panel, 2):
        agreement = agreement_summary(outcomes[first_label], outcomes[second_label], clusters=clusters, resamples=resamples)
        results |= {f"{first_label}_{second_label}/{name}": value for name, value in agreement.items()}
    return results


def strip_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos_token_id else ids


def scalars(computed: Mapping[str, Any]) -> dict[str, float]:
    """A metric's ``compute()`` as evaluation metric keys (``win_rate`` -> ``eval/win_rate``)."""
    return {metric_keys.stage_key(metric_keys.EVAL, name): float(value) for name, value in computed.items()}


def sequence_logps(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad: int,
    batch_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log π(y | x) of each response under ``model`` with its logits divided by ``temperature``: the
    log-probability under the distribution the response was sampled from. Batches are shared by the ranks."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(k: int, start: int) -> torch.Tensor:
        chunk_prompts, chunk_responses = prompts[start : start + batch_size], responses[start : start + batch_size]
        length = max(len(p) + len(r) for p, r in zip(chunk_prompts, chunk_responses, strict=True))
        sequences = {
            key: value.to(device) for key, value in padded_sequences(chunk_prompts, chunk_responses, length, pad).items()
        }
        logits = model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits / temperature
        return response_logps(logits, sequences["input_ids"], sequences["loss_mask"]).double().cpu()

    with evaluating(model):
        return torch.cat(map_sharded(range(0, len(prompts), batch_size), score))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _stored_metrics(path: Path) -> dict[str, float]:
    """A finished evaluation's metrics, refused if the file changed since it was written."""
    cache.check_seal(path)
    return read_json(path, cache.metrics)

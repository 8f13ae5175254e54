"""Typed run records, the one builder of a tracked run's spec, and the one function that opens a run in the tracking store
(and so writes its tags)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from expo_bench import tracking
from expo_bench.cache import check_seal, digest, integer, metrics, number, read_json
from expo_bench.distributed import broadcast, is_global_zero
from expo_bench.metric_keys import Metric
from expo_bench.tracking import RunLog, TrackedRun


@dataclass(frozen=True)
class TrackedRunSpec:
    """Who a run is in the tracking store: one run per ``key``, ever; the seeds of one configuration share
    ``config_key`` (the leaderboard averages over them)."""

    key: str
    name: str
    method: str
    """The method's label in the recipe: one leaderboard row per label."""
    method_class: str
    seed: int
    config_key: str
    dataset: str
    """One leaderboard table per dataset."""
    model: str
    rank_by: Metric
    params: Mapping[str, Any]
    selection_by: str | None = None
    """The ``selection/...`` metric that picks its configuration on prompts set aside for it, if it logs one."""
    """Recorded as the run's (flattened) params."""
    judge: str | None = None
    data_fingerprint: str | None = None
    model_fingerprint: str | None = None
    regularization: str | None = None
    """The name of the hyperparameter that is the method's λ (``beta``), if it has one."""
    instance: str | None = None
    """The task instance, where the recipe runs several (seeds pair within one)."""


def tracked_run_spec(
    key: str,
    label: str,
    lam: float | None,
    identity: Mapping[str, Any],
    shared: Mapping[str, Any],
    table: tuple[str, str, Metric],
    *,
    detail: str = "",
    logged: Mapping[str, Any] | None = None,
    selection_by: str | None = None,
    judge: str | None = None,
    regularization: str | None = None,
    instance: str | None = None,
) -> TrackedRunSpec:
    """The spec of every tracked run, language model or tabular. ``identity`` is what the run is (its ``method_class``,
    ``params``, ``seed`` and, for a language model, its data and reference fingerprints), ``shared`` what the seeds of
    its configuration share (digested into the config key), ``table`` its leaderboard table's (dataset, model, rank
    metric). The run is named ``<label> λ=<lam> <detail> s<seed>`` and records as params its label, its λ (a method's:
    the SFT reference has no ``params`` and no λ), ``identity`` and ``logged``."""
    seed = int(identity["seed"])
    dataset, model, rank_by = table
    return TrackedRunSpec(
        key=key,
        name=" ".join(part for part in (display_name(label, lam), detail, f"s{seed}") if part),
        method=label,
        method_class=str(identity["method_class"]),
        seed=seed,
        config_key=digest(dict(shared)),
        dataset=dataset,
        model=model,
        rank_by=rank_by,
        params={"method": label, **({} if identity.get("params") is None else {"lam": lam}), **identity, **(logged or {})},
        selection_by=selection_by,
        judge=judge,
        data_fingerprint=identity.get("data_fingerprint"),
        model_fingerprint=identity.get("reference_fingerprint"),
        regularization=regularization,
        instance=instance,
    )


def open_run(runs: RunLog, identity: TrackedRunSpec) -> TrackedRun:
    """The tracked run of ``identity`` (the one recorded under its key, or a new one), tagged for the leaderboard.

    Rank zero alone opens and records it; the other ranks hold a :class:`RankMirror` of it."""
    tags = {
        tracking.METHOD: identity.method,
        tracking.METHOD_CLASS: identity.method_class,
        tracking.DATASET: identity.dataset,
        tracking.MODEL: identity.model,
        tracking.SEED: str(identity.seed),
        tracking.CONFIG_KEY: identity.config_key,
        tracking.RANK_METRIC: identity.rank_by.key,
        tracking.RANK_GOAL: identity.rank_by.goal,
    }
    optional = {
        tracking.JUDGE: identity.judge,
        tracking.DATA_FINGERPRINT: identity.data_fingerprint,
        tracking.MODEL_FINGERPRINT: identity.model_fingerprint,
        tracking.SELECTION_METRIC: identity.selection_by,
        tracking.REGULARIZATION: identity.regularization,
        tracking.INSTANCE: identity.instance,
    }
    tags |= {tag: value for tag, value in optional.items() if value is not None}
    run = runs.child(identity.key, identity.name, identity.params, tags) if is_global_zero() else None
    if run is not None and run.complete and identity.instance is not None:
        run.set_tags({tracking.INSTANCE: identity.instance})  # a run finished before its recipe named instances: it is one
    uri, run_id, complete = broadcast((run.uri, run.run_id, run.complete) if run else ("", "", False))
    return run or tracking.RankMirror(uri, run_id, identity.key, complete)


def display_name(method: str, lam: float | None) -> str:
    """``dpo λ=0.1``: a run's method and, when a grid set it, its λ."""
    return method + ("" if lam is None else f" λ={lam:g}")


class RunRecord(Protocol):
    """One run's results, as a sweep returns them to the runner."""

    @property
    def method(self) -> str: ...

    def summary(self) -> dict[str, Any]:
        """The run's entry in ``summary.json``."""
        ...


@dataclass(frozen=True)
class TabularRecord:
    """One replica of a tabular run: its final policy, distances to π* and trajectory."""

    method: str
    method_class: str
    objective: str
    seed: int
    lam: float | None
    params: dict[str, Any]
    train: dict[str, Any]
    steps: int
    train_seconds: float
    final_policy: dict[str, list[float]]
    kl_star_to_policy: dict[str, float]
    kl_star_to_reference: dict[str, float]
    trajectory_steps: list[int]
    trajectory: list[list[list[float]]]
    """π(·|x) per snapshot: ``(T, P, R)``."""

    def summary(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "trajectory"}


@dataclass(frozen=True)
class SeedProvenance:
    """Where a seed's language-model runs came from: data, tokenizer and reference fingerprints, counts, and the
    SFT stage's and the task's own facts."""

    data_fingerprint: str
    tokenizer_fingerprint: str
    train_pairs: int
    eval_pairs: int
    truncated_prompts: int
    truncated_responses: int
    reference_fingerprint: str
    parameters: int
    facts: Mapping[str, str | int | float]

    def as_json(self) -> dict[str, Any]:
        fields = asdict(self)
        return {**{key: value for key, value in fields.items() if key != "facts"}, **dict(self.facts)}


@dataclass(frozen=True)
class TrainingResult:
    """What a finished language-model run writes to its ``record.json``."""

    steps: int
    train_seconds: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    loss_history: list[tuple[int, float]]
    eval_history: list[tuple[int, dict[str, float]]]
    weights: str
    """The final weights' file in the run directory (empty in records written before they were kept)."""
    weights_step: int
    """The optimizer step of those weights: the run's last (-1: unknown, an older record)."""
    grad_norm_history: list[tuple[int, float]]
    """``(step, gradient norm before clipping)`` where the run clips (empty where it does not, or in an older record)."""
    weights_sha256: str = ""
    """The final weights' sha256, checked before they are loaded again (empty in an older record)."""

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TrainingResult:
        return cls(
            integer(record["steps"]),
            number(record["train_seconds"]),
            metrics(record["eval_before"]),
            metrics(record["eval_after"]),
            [(integer(step), number(loss)) for step, loss in record["loss_history"]],
            [(integer(step), metrics(values)) for step, values in record["eval_history"]],
            str(record.get("weights", "")),
            integer(record.get("weights_step", -1)),
            [(integer(step), number(norm)) for step, norm in record.get("grad_norm_history", [])],
            str(record.get("weights_sha256", "")),
        )

    @classmethod
    def read(cls, path: Path) -> TrainingResult:
        """The record at ``path``; :class:`UserError` naming it and what is wrong when it is not one, or when it
        changed since it was written."""
        check_seal(path)
        return read_json(path, lambda record: cls.from_json(record))


@dataclass(frozen=True)
class RunDirectoryKey:
    """What identifies a language-model run's directory: its method class, hyperparameters, budget, seed, setup and
    the fingerprints of its data and reference; ``params`` is None for the SFT reference evaluated like a method."""

    method_class: str
    seed: int
    data_fingerprint: str
    reference_fingerprint: str
    params: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    reference: str | None = None
    reference_samples: dict[str, Any] | None = None
    """How the reference samples that KL estimates read were drawn (None: the task draws none)."""

    def as_json(self) -> dict[str, Any]:
        """The digest input of the run directory (its keys are part of every stored run's name)."""
        fingerprints = {"data_fingerprint": self.data_fingerprint, "reference_fingerprint": self.reference_fingerprint}
        if self.params is None:
            return {"method_class": self.method_class, "seed": self.seed, **fingerprints}
        setup = {
            "params": self.params,
            "train": self.train,
            "lora": self.lora,
            "reference": self.reference,
            "reference_samples": self.reference_samples,
        }
        return {"method_class": self.method_class, **setup, "seed": self.seed, **fingerprints}

    def configuration(self, lam: float | None) -> dict[str, Any]:
        """What the seeds of one configuration share: the identity without seed and fingerprints (with λ for methods)."""
        varying = {"seed", "data_fingerprint", "reference_fingerprint"}
        shared = {key: value for key, value in self.as_json().items() if key not in varying}
        return shared if self.params is None else shared | {"lam": lam}


@dataclass(frozen=True)
class LanguageModelRecord:
    """A language-model run: a trained method, or the SFT reference evaluated like one (``training`` None)."""

    method: str
    lam: float | None
    directory_key: RunDirectoryKey
    provenance: SeedProvenance
    training: TrainingResult | None
    evaluation: dict[str, float] | None
    regularization: str | None = None
    """The hyperparameter that is the method's λ (``beta``), if it has one: what the reports show as λ."""
    samples: Path | None = None
    """The evaluation's samples on the reported prompts at the leaderboard temperature (None: not evaluated)."""

    @property
    def seed(self) -> int:
        return self.directory_key.seed

    def summary(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": self.method, "lam": self.lam, **self.directory_key.as_json()}
        if self.training is not None:
            entry |= asdict(self.training)
        else:
            entry["params"] = {}
        if self.evaluation is not None:
            entry["eval"] = self.evaluation
        return entry | self.provenance.as_json()

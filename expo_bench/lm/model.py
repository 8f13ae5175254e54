"""Causal language models as policies and references: per-sequence log-probs over response tokens."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from expo_bench.config_model import ConfigModel
from expo_bench.contracts import Sequences

if TYPE_CHECKING:  # transformers' models and peft are imported where they are used: a recipe validates without them
    from transformers import PreTrainedModel


class ModelConfig(ConfigModel):
    """A causal LM from the hub or a local folder (``name_or_path``), or a tiny one built from a config.

    ``tiny`` is an architecture config, e.g. ``{model_type: gpt_neox, hidden_size: 64, ...}``: weights are
    initialised from the seed, so tests and the embedded quickstart need no download.
    """

    name_or_path: str | None = None
    tiny: dict[str, Any] | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("give exactly one of name_or_path (hub id or local folder) or tiny (an architecture config)")
        if self.tiny is not None and "model_type" not in self.tiny:
            raise ValueError("tiny needs a model_type, e.g. gpt_neox")
        return self

    def build(self, vocab_size: int | None = None) -> PreTrainedModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.name_or_path is not None:
            return AutoModelForCausalLM.from_pretrained(self.name_or_path, revision=self.revision)
        assert self.tiny is not None
        settings = dict(self.tiny)
        if vocab_size is not None:
            settings.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        return AutoModelForCausalLM.from_config(config)


def response_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Σ_t log π(x_t | x_<t) over response tokens (``loss_mask``), in float32: ``(N,)``.

    Position t is predicted by the logits at t - 1, so the first token is never scored (it is a prompt token).
    """
    targets = input_ids[:, 1:]
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (token_logps * loss_mask[:, 1:]).sum(-1)


class CausalLMScorer(nn.Module):
    """The :class:`~expo_bench.contracts.SequenceScorer` for a Hugging Face causal LM."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        logits = self.model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits
        return response_logps(logits, sequences["input_ids"], sequences["loss_mask"])

    @torch.no_grad()
    def response_entropy(self, sequences: Sequences) -> Tensor:
        logits = self.model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits
        logps = F.log_softmax(logits[:, :-1].float(), dim=-1)
        entropy = -(logps.exp() * logps).sum(-1)  # at t - 1: the distribution that predicts token t
        mask = sequences["loss_mask"][:, 1:].float()
        return (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def policy_model(module: nn.Module) -> PreTrainedModel:
    """The causal LM inside a method module's :class:`CausalLMScorer` policy."""
    return cast("PreTrainedModel", cast(CausalLMScorer, module.policy).model)


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


class LoraSettings(ConfigModel):
    """Train a LoRA adapter (peft) instead of all weights; ``target_modules`` default to peft's per-architecture choice."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None

    def wrap(self, model: PreTrainedModel) -> PreTrainedModel:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules)
        return cast("PreTrainedModel", get_peft_model(model, config))  # PeftModel forwards the model's interface


class AdapterDisabledScorer(nn.Module):
    """The reference as the policy's own base weights with its LoRA adapter switched off: no second copy.

    The shared model is held outside ``nn.Module``'s registry, so freezing or evaluating this reference
    never touches the policy it belongs to.
    """

    def __init__(self, policy: PreTrainedModel) -> None:
        super().__init__()
        self._shared = [policy]

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        model = self._shared[0]
        with torch.no_grad(), model.disable_adapter():  # type: ignore[operator]
            logits = model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits
        return response_logps(logits, sequences["input_ids"], sequences["loss_mask"])


class CachedReference(nn.Module):
    """Stands in for a reference whose log-probs every batch carries, so none is kept in memory."""

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        raise RuntimeError("reference log-probs are cached in the batches; this run keeps no reference model")


ReferenceKind = Literal["cached", "frozen_copy", "adapter_disabled"]

REFERENCES: dict[str, Callable[[PreTrainedModel, PreTrainedModel], nn.Module]] = {
    "cached": lambda base, policy: CachedReference(),
    "frozen_copy": lambda base, policy: CausalLMScorer(copy.deepcopy(base)),
    "adapter_disabled": lambda base, policy: AdapterDisabledScorer(policy),
}
"""How the reference is built from the SFT model (``base``) and the policy about to be trained."""

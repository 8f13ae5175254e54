"""Causal language models as policies and references: per-sequence log-probs over response tokens."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from expo_bench.config_model import ConfigModel, LocalOrHub, closest, reject_non_finite, reject_unknown_keys
from expo_bench.contracts import Sequences
from expo_bench.distributed import accelerator_device

if TYPE_CHECKING:  # transformers' models and peft are imported where they are used: a recipe validates without them
    from transformers import PreTrainedModel


class ModelConfig(ConfigModel):
    """A causal LM from the hub or a local folder (``name_or_path``), or a tiny one built from a config.

    ``tiny`` is an architecture config, e.g. ``{model_type: gpt_neox, hidden_size: 64, ...}``: weights are
    initialised from the seed, so tests and the embedded quickstart need no download. Its keys are checked against
    the architecture's config class: transformers would keep a misspelt key as a stray attribute and build the
    full-size default model instead.
    """

    name_or_path: LocalOrHub | None = None
    """A hub id (``EleutherAI/pythia-2.8b``) or a local folder of ``save_pretrained`` weights; or give ``tiny``."""
    tiny: dict[str, Any] | None = None
    """A small model built from an architecture config, with random weights from the seed, instead of downloaded ones:
    to try a recipe on a CPU in minutes (no hub, no GPU), never for results. ``model_type`` names the architecture
    (``gpt2``, ``gpt_neox``, ``llama``, any transformers config); the other keys are that config's fields, checked by
    name, e.g. ``{model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 4, n_positions: 160}``. The vocabulary size is
    the tokenizer's unless given."""
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The weights' dtype: the master weights the optimizer updates (mixed precision computes in 16 bits from fp32
    masters). A checkpoint saved in another dtype is cast to it; transformers would otherwise keep the checkpoint's own."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """PyTorch's scaled-dot-product attention, the plain one, or FlashAttention-2 (CUDA, ``pip install flash-attn``)."""

    @field_validator("tiny")
    @classmethod
    def _architecture_keys(cls, tiny: dict[str, Any] | None) -> dict[str, Any] | None:
        if tiny is None or "model_type" not in tiny:
            return tiny  # the model validator below says what is missing
        from transformers import CONFIG_MAPPING  # the configuration classes only, not the models

        model_type = tiny["model_type"]
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown model_type {model_type!r}{closest(str(model_type), list(CONFIG_MAPPING))}")
        config_class = CONFIG_MAPPING[model_type]
        valid = dict.fromkeys(
            [*inspect.signature(config_class).parameters, *config_class.attribute_map, *config_class().to_dict()]
        )
        reject_unknown_keys(tiny, [key for key in valid if not key.startswith("_") and key != "transformers_version"], model_type)
        reject_non_finite(tiny)
        return tiny

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("give exactly one of name_or_path (hub id or local folder) or tiny (an architecture config)")
        if self.tiny is not None and "model_type" not in self.tiny:
            raise ValueError("tiny needs a model_type, e.g. gpt_neox")
        return self

    def build(self, vocab_size: int | None = None) -> PreTrainedModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        loading = {"dtype": getattr(torch, self.dtype), "attn_implementation": self.attn_implementation}
        if self.name_or_path is not None:
            return AutoModelForCausalLM.from_pretrained(self.name_or_path, revision=self.revision, **loading)
        assert self.tiny is not None
        settings = dict(self.tiny)
        if vocab_size is not None:
            settings.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        return AutoModelForCausalLM.from_config(config, **loading)

    def machine_problems(self, gpus: int, packages: frozenset[str]) -> list[tuple[str, str]]:
        """Why this model cannot load here, as (field, message)."""
        if self.attn_implementation != "flash_attention_2" or ("flash_attn" in packages and gpus):
            return []
        return [("attn_implementation", "flash_attention_2 needs a CUDA GPU and the flash-attn package (pip install flash-attn)")]


def transformer_blocks(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the model's transformer blocks (Hugging Face's ``_no_split_modules``): FSDP's wrapping units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(module) for module in model.modules() if type(module).__name__ in names}


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations block by block in the backward pass (non-reentrant: works under FSDP and with frozen inputs)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


CHUNK_ELEMENTS = 1 << 24
"""Logits upcast to fp32 at a time by :func:`token_logps` on an accelerator (64 MiB); a CPU takes a quarter of that."""


def chunk_positions(logits: Tensor) -> int:
    """Sequence positions per chunk of ``(N, T, V)`` logits: :data:`CHUNK_ELEMENTS` logits at a time on an accelerator, a
    quarter on a CPU, where a 16 MiB chunk stays in the caches: forward and backward over 16 × 127 × 50,304 logits take
    0.29 s instead of 0.63-0.75 s (``benchmarks/README.md``). Positions are computed independently, so the chunk
    changes no number."""
    budget = CHUNK_ELEMENTS if logits.device.type != "cpu" else CHUNK_ELEMENTS // 4
    return max(1, budget // max(1, logits.shape[0] * logits.shape[-1]))


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] at every position, computed over chunks of positions (at least float32): neither
    pass materialises a float32 copy of the whole ``(N, T, V)`` logits, and only the logits themselves (in their own
    dtype) and one log-normaliser per position are kept for the backward pass."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        picked = torch.empty(targets.shape, dtype=compute, device=logits.device)
        normalizer = torch.empty_like(picked)
        for start in range(0, targets.shape[1], chunk):
            piece = logits[:, start : start + chunk].to(compute)
            normalizer[:, start : start + chunk] = torch.logsumexp(piece, dim=-1)
            picked[:, start : start + chunk] = piece.gather(-1, targets[:, start : start + chunk, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets, normalizer)
        ctx.chunk = chunk
        return picked - normalizer

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        logits, targets, normalizer = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, targets.shape[1], ctx.chunk):
            window = slice(start, start + ctx.chunk)
            upstream = grad_output[:, window, None]
            # d/dz_j (z_t - logsumexp z) = [j = t] - softmax(z)_j
            piece = -torch.exp(logits[:, window].to(normalizer.dtype) - normalizer[:, window, None]) * upstream
            grad[:, window] = piece.scatter_add_(-1, targets[:, window, None], upstream).to(grad.dtype)
        return grad, None, None


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log_softmax(logits)`` at ``targets`` for every position, ``(N, T)`` in (at least) float32, memory-lean."""
    return cast(Tensor, _TokenLogps.apply(logits, targets, chunk_positions(logits)))


def response_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Σ_t log π(x_t | x_<t) over response tokens (``loss_mask``), in float32: ``(N,)``.

    Position t is predicted by the logits at t - 1, so the first token is never scored (it is a prompt token).
    """
    return (token_logps(logits[:, :-1], input_ids[:, 1:]) * loss_mask[:, 1:]).sum(-1)


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
        logits = self.model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits[:, :-1]
        entropy = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        chunk = chunk_positions(logits)
        for start in range(0, logits.shape[1], chunk):  # fp32 a chunk at a time, as in token_logps
            logps = F.log_softmax(logits[:, start : start + chunk].float(), dim=-1)
            entropy[:, start : start + chunk] = -(logps.exp() * logps).sum(-1)  # at t - 1: the distribution predicting t
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


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode (no dropout) for the block, then back in the mode each was in."""
    modes = [(model, model.training) for model in models]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)


@contextmanager
def on_accelerator(*models: nn.Module) -> Iterator[torch.device]:
    """The models on this process's accelerator for the block, then back on the device each came from (a periodic
    evaluation runs in the middle of training; the shared SFT model waits on the CPU between uses). ``nn.Module.to``:
    a transformers model's own ``to`` refuses quantized weights."""
    device = accelerator_device()
    homes = [next(model.parameters()).device for model in models]
    for model in models:
        nn.Module.to(model, device)
    try:
        yield device
    finally:
        for model, home in zip(models, homes, strict=True):
            nn.Module.to(model, home)

"""Exact KL between two causal LMs' response distributions, where the response space is small enough to enumerate
(the synthetic-token task): the distance the sampled estimate ``eval/kl`` only estimates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from expo_bench.lm.model import evaluating

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MAX_PREFIXES = 2_000_000
"""Most unfinished prefixes one prompt may have at any depth: beyond it enumeration is no longer the cheap way."""


def vocabulary_size(model: PreTrainedModel) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def enumerable(model: PreTrainedModel, max_new_tokens: int) -> bool:
    """Whether :func:`sequence_kl` can enumerate ``model``'s responses: at most :data:`MAX_PREFIXES` per depth."""
    return (vocabulary_size(model) - 1) ** max(max_new_tokens - 1, 0) <= MAX_PREFIXES


def sequence_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    batch_size: int = 4096,
) -> list[float]:
    """KL(π(·|x) ‖ π_ref(·|x)) per prompt over every response that sampling at temperature 1 with no truncation can
    draw: up to ``max_new_tokens`` tokens, ending at the first EOS or at the limit. By the chain rule it is
    Σ_h π(h|x) · KL(π(·|x, h) ‖ π_ref(·|x, h)) over the unfinished prefixes h (no EOS yet, shorter than the limit),
    enumerated depth by depth; no prefix is pruned, so the sum is exact up to the models' float round-off."""
    if not enumerable(policy, max_new_tokens):
        raise ValueError(f"{max_new_tokens} new tokens of a vocabulary of {vocabulary_size(policy)}: too many to enumerate")
    with evaluating(policy, reference):
        return [_prompt_kl(policy, reference, prompt, max_new_tokens, eos_token_id, batch_size) for prompt in prompts]


@torch.no_grad()
def _prompt_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    prompt: list[int],
    max_new_tokens: int,
    eos_token_id: int,
    batch_size: int,
) -> float:
    device = next(policy.parameters()).device
    prefixes = torch.tensor([prompt], dtype=torch.long, device=device)
    prefix_logps = torch.zeros(1, dtype=torch.float64, device=device)  # log π(h|x)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for depth in range(max_new_tokens):
        policy_next, reference_next = _next_token_logps(policy, reference, prefixes, batch_size)
        total += (prefix_logps.exp() * (policy_next.exp() * (policy_next - reference_next)).sum(-1)).sum()
        if depth + 1 == max_new_tokens:
            break
        continuing = torch.arange(policy_next.shape[-1], device=device)
        continuing = continuing[continuing != eos_token_id]  # EOS ends a response: no prefix goes on from it
        prefix_logps = (prefix_logps[:, None] + policy_next[:, continuing]).reshape(-1)
        prefixes = torch.cat(
            [prefixes.repeat_interleave(len(continuing), dim=0), continuing.repeat(len(prefixes))[:, None]], dim=1
        )
    return float(total)


def _next_token_logps(
    policy: PreTrainedModel, reference: PreTrainedModel, prefixes: Tensor, batch_size: int
) -> tuple[Tensor, Tensor]:
    """log π(·|h) and log π_ref(·|h) in float64 for each row h (all of one length: no padding)."""
    found: tuple[list[Tensor], list[Tensor]] = ([], [])
    for start in range(0, len(prefixes), batch_size):
        rows = prefixes[start : start + batch_size]
        for model, into in ((policy, found[0]), (reference, found[1])):
            logits = model(input_ids=rows.to(next(model.parameters()).device)).logits[:, -1]
            into.append(torch.log_softmax(logits.double(), dim=-1).to(prefixes.device))
    return torch.cat(found[0]), torch.cat(found[1])

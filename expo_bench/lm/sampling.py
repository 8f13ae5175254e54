"""Batched sampling from a causal LM (KV-cached ``generate``), seeded, returning response token ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from transformers import PreTrainedModel

from expo_bench.config_model import ConfigModel


class SamplingConfig(ConfigModel):
    """How many responses per prompt, how long, and how random."""

    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    config: SamplingConfig,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
) -> list[list[list[int]]]:
    """``samples_per_prompt`` responses for each prompt, each up to and including its EOS.

    Prompts are left-padded so generation continues every row from its last real token.
    """
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    responses: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start : start + config.batch_size]
            width = max(len(prompt) for prompt in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                attention_mask[row, width - len(prompt) :] = 1
            output = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=config.max_new_tokens,
                num_return_sequences=config.samples_per_prompt,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
            )
            generated = output[:, width:].tolist()
            for index in range(len(chunk)):
                rows = generated[index * config.samples_per_prompt : (index + 1) * config.samples_per_prompt]
                responses.append([until_eos(row, eos_token_id) for row in rows])
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    return responses


def until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """The tokens up to and including the first EOS (generation pads finished rows after it)."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids

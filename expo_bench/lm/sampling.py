"""Batched sampling from a causal LM (KV-cached ``generate``), seeded, returning response token ids.

The distribution is exactly the one the config names: softmax(logits / temperature), truncated only by the
config's own ``top_p`` and ``top_k``. Nothing is inherited from transformers' defaults (a hidden top-k of 50) or
from a hub model's ``generation_config`` (repetition penalties, bad words, forced tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from expo_bench.config_model import ConfigModel
from expo_bench.distributed import map_sharded
from expo_bench.lm.model import evaluating
from expo_bench.reporting import Done

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel


class SamplingConfig(ConfigModel):
    """How many responses per prompt, how long, and how random."""

    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; 1 keeps the whole distribution."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens; 0 keeps them all."""
    batch_size: int = Field(16, ge=1)

    @property
    def untruncated(self) -> bool:
        """Whether samples come from the model's own distribution at temperature 1 (no temperature, top-p or top-k)."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k == 0

    def generation_config(self, pad_token_id: int, eos_token_id: int) -> GenerationConfig:
        """Every setting ``generate`` reads, explicit."""
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            bad_words_ids=None,
            suppress_tokens=None,
            begin_suppress_tokens=None,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            min_new_tokens=0,
            max_new_tokens=self.max_new_tokens,
            num_beams=1,
            num_return_sequences=self.samples_per_prompt,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )


def sample_responses(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    config: SamplingConfig,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    done: Done | None = None,
) -> list[list[list[int]]]:
    """``samples_per_prompt`` responses for each prompt, each up to and including its EOS; ``done`` is told how many
    prompts are sampled after each batch.

    The prompts are cut in order into slices of ``config.batch_size``, and slice k is sampled from the RNG seeded by
    ``(seed, k)`` alone: under several ranks each samples its share of the slices (from its own full copy of the
    model) and all are gathered in order, so the result does not depend on how many ranks there are.
    """
    slices = [list(prompts[start : start + config.batch_size]) for start in range(0, len(prompts), config.batch_size)]
    generation = config.generation_config(pad_token_id, eos_token_id)

    def sample(k: int, chunk: list[list[int]]) -> list[list[list[int]]]:
        responses = _sample_slice(model, chunk, generation, slice_seed(seed, k), eos_token_id)
        if done is not None:  # the ranks advance together: when slice k is sampled, so are about the first k + 1
            done(min(len(prompts), (k + 1) * config.batch_size))
        return responses

    return [responses for part in map_sharded(slices, sample) for responses in part]


def slice_seed(seed: int, index: int) -> int:
    """The RNG seed of slice ``index`` of a sampling call seeded ``seed``: distinct for distinct pairs."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def _sample_slice(
    model: PreTrainedModel, prompts: list[list[int]], generation: GenerationConfig, seed: int, eos_token_id: int
) -> list[list[list[int]]]:
    """One ``generate`` call; prompts are left-padded so generation continues every row from its last real token."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = generation.pad_token_id
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    # generate() fills every setting left unset from the model's own generation_config: blank it while sampling
    inherited, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with evaluating(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=generation
            )
    finally:
        model.generation_config = inherited
    generated = output[:, width:].tolist()
    per_prompt = generation.num_return_sequences
    return [
        [until_eos(row, eos_token_id) for row in generated[i * per_prompt : (i + 1) * per_prompt]] for i in range(len(prompts))
    ]


def until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """The tokens up to and including the first EOS (generation pads finished rows after it)."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids

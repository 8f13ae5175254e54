"""Tokenized preference pairs with explicit, recorded truncation, collated into the batch contract.

Prompt and responses are tokenized separately so the prompt/response boundary is exact (no guessing it
from a joint tokenization), and truncation is flagged per pair: peers truncate silently (DESIGN §4).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from expo_bench.config_model import ConfigModel
from expo_bench.contracts import PreferenceBatch, Sequences
from expo_bench.lm.pairs import PromptPair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PromptTruncation = Literal["keep_end", "keep_start"]

TRUNCATE_PROMPT: dict[str, Callable[[list[int], int], list[int]]] = {
    "keep_end": lambda ids, length: ids[-length:],
    "keep_start": lambda ids, length: ids[:length],
}


class TokenizationConfig(ConfigModel):
    """Lengths in tokens (DPO defaults). ``keep_end`` keeps the most recent turns and the final assistant tag."""

    max_length: int = Field(512, gt=0)
    max_prompt_length: int = Field(256, gt=0)
    prompt_truncation: PromptTruncation = "keep_end"

    @model_validator(mode="after")
    def _room_for_a_response(self) -> TokenizationConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be less than max_length ({self.max_length}) "
                "so every response keeps at least one token"
            )
        return self


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; responses end with EOS unless ``response_truncated`` cut it off. ``label`` is
    P(chosen beats rejected), 1 for a hard label."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool
    label: float = 1.0


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id to end responses with")
    return int(eos)


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], config: TokenizationConfig, label: float = 1.0
) -> TokenizedPair:
    """Truncate as the DPO reference does, only when prompt + longer response exceeds ``max_length``: the prompt
    is cut to ``max_prompt_length``, then both responses keep their first ``max_length - len(prompt)`` tokens (at
    least one, as ``max_prompt_length < max_length``), so no response is ever empty."""
    prompt_truncated = response_truncated = False
    if len(prompt) + max(len(chosen), len(rejected)) > config.max_length:
        if len(prompt) > config.max_prompt_length:
            prompt = TRUNCATE_PROMPT[config.prompt_truncation](prompt, config.max_prompt_length)
            prompt_truncated = True
        budget = config.max_length - len(prompt)
        response_truncated = max(len(chosen), len(rejected)) > budget
        chosen, rejected = chosen[:budget], rejected[:budget]
    return TokenizedPair(prompt, chosen, rejected, prompt_truncated, response_truncated, label)


MARGIN_TOKENS = 64
"""Tokens beyond those kept that a cut text must still yield: where a text is cut, its last word may tokenize otherwise."""


@functools.lru_cache(maxsize=8)
def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token can stand for: its longest vocabulary entry (a byte-level entry has one character
    per byte, a WordPiece one a ``##`` too many: never an underestimate)."""
    return max(map(len, tokenizer.get_vocab()))


WORD_END = re.compile(r"(?<=\S)\s")


def _whole_words_from(text: str, start: int) -> int:
    """The first word end at or after ``start`` (whitespace after a non-space: what follows tokenizes as it does in the
    whole text); ``len(text)`` if none."""
    match = WORD_END.search(text, max(start, 1))
    return len(text) if match is None else match.start()


def bounded_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], tokens: int, from_end: bool = False
) -> list[tuple[list[int], bool]]:
    """Each text's token ids as tokenizing it whole gives them, but at most its first (``from_end``: last) ``tokens`` + 1,
    and whether that is all of them: a text longer than ``tokens`` + :data:`MARGIN_TOKENS` tokens can span is cut
    before it is tokenized (a 50 MB line costs what a long one does; at its start, from the end, at a word boundary)."""
    span = (tokens + MARGIN_TOKENS) * max_token_chars(tokenizer)
    cuts = [
        text if len(text) <= span else text[_whole_words_from(text, len(text) - span) :] if from_end else text[:span]
        for text in texts
    ]
    encoded = tokenizer(cuts, add_special_tokens=False)["input_ids"]
    out = []
    for text, cut, ids in zip(texts, cuts, encoded, strict=True):
        if cut is not text and len(ids) < tokens + MARGIN_TOKENS:  # fewer tokens than the bound promised: no cut
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        whole = len(ids) <= tokens
        out.append((list(ids) if whole else list(ids[-tokens - 1 :] if from_end else ids[: tokens + 1]), whole))
    return out


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    config: TokenizationConfig,
) -> list[tuple[list[int], list[int], list[int]]]:
    """Each pair's (prompt, chosen + EOS, rejected + EOS) ids, bounded by ``max_length`` (:func:`bounded_ids`) so that
    :func:`truncate_pair` makes of them exactly what it makes of the whole texts' ids."""
    eos = eos_id(tokenizer)
    keep_end = config.prompt_truncation == "keep_end"

    def responses(texts: Sequence[str]) -> list[list[int]]:  # a cut response loses its EOS with its end
        return [[*ids, eos] if whole else ids for ids, whole in bounded_ids(tokenizer, texts, config.max_length)]

    prompt_ids = [ids for ids, _ in bounded_ids(tokenizer, prompts, config.max_length, from_end=keep_end)]
    return list(zip(prompt_ids, responses(chosen), responses(rejected), strict=True))


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, pair: PromptPair, config: TokenizationConfig) -> TokenizedPair:
    """Tokenize without special tokens, append EOS to each response, then :func:`truncate_pair`."""
    [(prompt, chosen, rejected)] = tokenize_texts(tokenizer, [pair.prompt], [pair.chosen], [pair.rejected], config)
    return truncate_pair(prompt, chosen, rejected, config, pair.label)


def padded_sequences(prompts: list[list[int]], responses: list[list[int]], length: int, pad_token_id: int) -> Sequences:
    """Right-padded prompt + response rows; ``loss_mask`` marks exactly the response tokens."""
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response)
        attention_mask[row, :end] = 1
        loss_mask[row, len(prompt) : end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int) -> PreferenceBatch:
    """A batch whose chosen and rejected sequences share one length, so they concatenate for one forward pass."""
    prompts = [pair.prompt_ids for pair in pairs]
    chosen = [pair.chosen_ids for pair in pairs]
    rejected = [pair.rejected_ids for pair in pairs]
    length = max(len(prompt) + len(response) for prompt, response in zip(prompts * 2, chosen + rejected, strict=True))
    return PreferenceBatch(
        chosen=padded_sequences(prompts, chosen, length, pad_token_id),
        rejected=padded_sequences(prompts, rejected, length, pad_token_id),
        chosen_tokens=torch.tensor([len(ids) for ids in chosen], dtype=torch.float32),
        rejected_tokens=torch.tensor([len(ids) for ids in rejected], dtype=torch.float32),
        label=torch.tensor([pair.label for pair in pairs], dtype=torch.float32),
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, or EOS where it has none (GPT-2, Pythia): padding is masked out anyway."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    return int(pad)


def fingerprint_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    """Short sha256 of the tokenizer's serialization (vocab, merges, normalizer), for results' provenance."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def unseen_prompts(pairs: Sequence[TokenizedPair], seen: Sequence[TokenizedPair]) -> list[TokenizedPair]:
    """The pairs whose prompt no pair of ``seen`` has: held out means unseen (a policy is not scored on a prompt it
    trained on)."""
    prompts = {tuple(pair.prompt_ids) for pair in seen}
    return [pair for pair in pairs if tuple(pair.prompt_ids) not in prompts]

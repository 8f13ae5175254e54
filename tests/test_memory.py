"""Memory-lean training pieces: per-token log-probs without a full float32 log-softmax, chunked entropy, and
batches grouped by length."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data
from torch.nn import functional as F

from expo_bench.lm import model as lm_model
from expo_bench.lm.data import EpochSeededSampler, InOrderSampler, LengthGroupedSampler, pair_length
from expo_bench.lm.hh import load_hh_pairs
from expo_bench.lm.model import CausalLMScorer, ModelConfig, response_logps, token_logps
from expo_bench.lm.tokenize import TokenizationConfig, collate_pairs, tokenize_pair

SHARED = SHARED_DATA
TINY = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 128}  # fmt: skip


def full_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The harness's log-probs before: a float32 log-softmax over the whole vocabulary at every position."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@pytest.mark.parametrize("chunk_elements", [7, 1000, 1 << 24])  # one position per chunk, a few, all at once
def test_token_logps_equal_the_full_log_softmax_with_their_gradients(chunk_elements: int, monkeypatch: Any) -> None:
    monkeypatch.setattr(lm_model, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 17, 50, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (3, 17))
    assert torch.autograd.gradcheck(lambda z: token_logps(z, targets), (logits,))
    fp32 = logits.detach().float().requires_grad_()
    new, old = token_logps(fp32, targets), full_log_softmax(fp32, targets)
    assert new.dtype == torch.float32
    torch.testing.assert_close(new, old, rtol=0, atol=1e-5)
    weights = torch.randn(3, 17)
    torch.testing.assert_close(
        torch.autograd.grad((new * weights).sum(), fp32)[0], torch.autograd.grad((old * weights).sum(), fp32)[0]
    )
    # bf16 logits: float32 results, gradients in bf16 as the logits' own
    half = logits.detach().bfloat16().requires_grad_()
    torch.testing.assert_close(token_logps(half, targets), full_log_softmax(half, targets), rtol=0, atol=1e-5)
    gradient = torch.autograd.grad((token_logps(half, targets) * weights).sum(), half)[0]
    assert gradient.dtype == torch.bfloat16


@needs_shared_data()
def test_a_models_response_log_probs_and_entropy_equal_the_full_computation(monkeypatch: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt-neox-20b")
    pairs, _ = load_hh_pairs(str(SHARED / "hh-rlhf"), "helpful-base", "test")
    tokenized = [tokenize_pair(tokenizer, pair, TokenizationConfig(max_length=48, max_prompt_length=32)) for pair in pairs[:6]]
    sequences = collate_pairs(tokenized, tokenizer.eos_token_id).chosen
    torch.manual_seed(0)
    scorer = CausalLMScorer(ModelConfig(tiny=TINY).build(vocab_size=len(tokenizer)))
    monkeypatch.setattr(lm_model, "CHUNK_ELEMENTS", 6 * len(tokenizer) * 5)  # 5 positions per chunk
    logits = scorer.model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits
    per_token = full_log_softmax(logits[:, :-1], sequences["input_ids"][:, 1:])
    torch.testing.assert_close(token_logps(logits[:, :-1], sequences["input_ids"][:, 1:]), per_token, rtol=0, atol=1e-5)
    full = (per_token * sequences["loss_mask"][:, 1:]).sum(-1)  # sums of ~30 tokens near -10: float32 keeps 7 digits
    torch.testing.assert_close(response_logps(logits, sequences["input_ids"], sequences["loss_mask"]), full, rtol=1e-6, atol=0)
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = sequences["loss_mask"][:, 1:].float()
    entropy = ((-(logps.exp() * logps).sum(-1)) * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(scorer.response_entropy(sequences), entropy, rtol=0, atol=1e-5)


def shards(sampler_of: Any, world: int) -> list[list[int]]:
    """What each of ``world`` ranks' samplers yields (the ranks simulated by setting rank and world)."""
    found = []
    for rank in range(world):
        sampler = sampler_of()
        sampler.rank, sampler.world = rank, world
        if isinstance(sampler, LengthGroupedSampler):
            sampler.span = sampler.span // 1 * world  # what the sampler computes from the world it is built in
        found.append(list(sampler))
    return found


def test_ranks_share_each_global_batch_of_one_process() -> None:
    alone = list(EpochSeededSampler(24, seed=3))
    assert sorted(alone) == list(range(24))
    two = shards(lambda: EpochSeededSampler(24, seed=3), 2)
    for step in range(3):  # batches of 4 per rank = the one process's batches of 8
        assert sorted(two[0][4 * step : 4 * step + 4] + two[1][4 * step : 4 * step + 4]) == sorted(alone[8 * step : 8 * step + 8])
    assert shards(lambda: InOrderSampler(5), 2) == [[0, 2, 4], [1, 3, 0]]  # equal shards, as DistributedSampler pads


@needs_shared_data()
def test_length_grouping_cuts_padding_and_keeps_every_pair_once() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt-neox-20b")
    pairs, _ = load_hh_pairs(str(SHARED / "hh-rlhf"), "helpful-base", "test")
    tokenized = [
        tokenize_pair(tokenizer, pair, TokenizationConfig(max_length=512, max_prompt_length=256)) for pair in pairs[:512]
    ]
    lengths = [pair_length(pair) for pair in tokenized]

    def padding(order: list[int], batch: int = 16) -> float:
        widths = [max(lengths[i] for i in order[s : s + batch]) for s in range(0, len(order), batch)]
        return 1 - sum(lengths) / (batch * sum(widths))

    shuffled = list(EpochSeededSampler(len(lengths), seed=0))
    grouped = list(LengthGroupedSampler(lengths, seed=0, batch_size=16, group=8))
    assert sorted(grouped) == sorted(shuffled) == list(range(len(lengths)))
    assert padding(grouped) < padding(shuffled) / 2, (padding(grouped), padding(shuffled))
    assert grouped != list(LengthGroupedSampler(lengths, seed=1, batch_size=16, group=8))  # still shuffled by seed


def test_the_chunk_size_changes_no_number() -> None:
    """Each position's log-normaliser is computed on its own: one position per chunk and all at once agree bit for bit,
    values and gradients (so the CPU's smaller chunks leave every stored result as it was)."""
    from expo_bench.lm.model import _TokenLogps, chunk_positions

    torch.manual_seed(0)
    logits, targets = torch.randn(4, 9, 300), torch.randint(0, 300, (4, 9))
    weights = torch.randn(4, 9)
    results = []
    for chunk in (1, 4, 9):
        leaf = logits.clone().requires_grad_()
        values = _TokenLogps.apply(leaf, targets, chunk)
        results.append((values.detach(), torch.autograd.grad((values * weights).sum(), leaf)[0]))
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other, strict=True))
    assert chunk_positions(torch.empty(16, 127, 50304)) == (lm_model.CHUNK_ELEMENTS // 4) // (16 * 50304)

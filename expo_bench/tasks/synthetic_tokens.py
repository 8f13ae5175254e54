"""The embedded quickstart task: preferences over short token sequences with a known reward, so the
Bradley–Terry-optimal policy and an oracle judge are exact. It needs no hub, no GPU and no download.

Each prompt is one token ``p<i>``; a response is ``response_length`` tokens from ``response_tokens``, then
EOS. The reward is additive, r(x, y) = Σ_t w[x, y_t] with w ~ N(0, reward_scale²) drawn from
``reward_seed``. Pairs of distinct responses are labelled by the BT model, P(y ≻ y') = σ(r(x, y) − r(x, y')),
whose preferences are exactly those of π*(y | x) ∝ exp r(x, y): the policy EXPO recovers as λ → 0 (the
paper's interpolation test, §6.1, here at the sequence level with a transformer policy).

What is held out is responses, not prompts: every prompt carries training pairs, and ``held_out_responses`` of each
prompt's responses appear in no SFT target or training pair. The evaluation prompts (those set aside for selection
and those reported) are therefore training prompts; the held-out pairs and the sampled win rate see the same prompts,
and the exact KL(π*‖π) covers all of a prompt's responses (with the default 0.25, 48 of its 64 were seen in training).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from rich.console import Console

from expo_bench import metric_keys
from expo_bench.evaluation.judges import OracleJudge
from expo_bench.lm.evaluator import ExactMetrics, sequence_logps
from expo_bench.lm.exact import enumerable, sequence_kl
from expo_bench.lm.model import ModelConfig
from expo_bench.lm.pairs import PromptPair
from expo_bench.lm.tokenize import tokenize_pair
from expo_bench.metric_keys import Metric
from expo_bench.tasks.language_model import LanguageModelTask, SFTExamples, TaskData

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

TINY_TRANSFORMER = ModelConfig(
    tiny={
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 16,
    }
)


class SyntheticTokensTask(LanguageModelTask):
    """Sequence-level preferences with a known additive reward; π* ∝ exp r is the BT-optimal policy."""

    kind: Literal["synthetic_tokens"]
    has_own_judge: ClassVar[bool] = True
    rank_by: ClassVar[Metric] = metric_keys.KL_TO_TARGET
    tokenizer: Literal["embedded"] = "embedded"
    """A word-level vocabulary built in code: pad, EOS, the prompt tokens and the response tokens."""
    model: ModelConfig = TINY_TRANSFORMER
    prompts: int = Field(8, ge=1)
    response_tokens: int = Field(4, ge=2, le=26)
    response_length: int = Field(3, ge=1, le=6)
    reward_scale: float = Field(1.0, gt=0)
    reward_seed: int = 0
    """The instance seed: it draws the reward table and each prompt's held-out responses, the task's definition, fixed
    across training seeds."""
    instances: list[int] | None = Field(None, min_length=1)
    """Several task instances: one instance seed each (it replaces ``reward_seed``), every training seed run on each.
    The leaderboard then reports per instance and pooled, with instances as the replication unit. None: the one
    instance ``reward_seed`` draws, runs untagged (as before the field existed, so their keys are unchanged)."""
    train_pairs_per_prompt: int = Field(64, ge=1)
    eval_pairs_per_prompt: int = Field(8, ge=1)
    held_out_responses: float = Field(0.25, ge=0, lt=1)
    """The fraction of each prompt's responses that no SFT target or training pair contains: held-out pairs compare
    only these, so held-out metrics are not measured on training data (0: pairs of any responses)."""

    @field_validator("instances")
    @classmethod
    def _distinct_instances(cls, instances: list[int] | None) -> list[int] | None:
        if instances is not None and len(set(instances)) != len(instances):
            raise ValueError(f"instance seeds must be distinct (got {instances})")
        return instances

    def task_instances(self) -> list[tuple[str | None, LanguageModelTask]]:
        """One per instance seed, named by it: the task with that ``reward_seed``."""
        if self.instances is None:
            return [(None, self)]
        fields = self.model_dump()
        return [
            (str(seed), type(self).model_validate(fields | {"reward_seed": seed, "instances": None})) for seed in self.instances
        ]

    @model_validator(mode="after")
    def _room_for_pairs(self) -> SyntheticTokensTask:
        held_out = self._held_out_count
        if held_out == 1 or len(self.responses) - held_out < 2:
            raise ValueError(
                f"held_out_responses {self.held_out_responses} keeps {held_out} of {len(self.responses)} responses per "
                "prompt out of training: each side needs at least 2 to make a pair"
            )
        return self

    @cached_property
    def vocabulary(self) -> list[str]:
        return [PAD, EOS, UNK, *(f"p{i}" for i in range(self.prompts)), *self._letters]

    @property
    def _letters(self) -> list[str]:
        return [chr(ord("a") + i) for i in range(self.response_tokens)]

    @cached_property
    def weights(self) -> torch.Tensor:
        """w[x, v]: the reward of response token v after prompt x."""
        generator = torch.Generator().manual_seed(self.reward_seed)
        return self.reward_scale * torch.randn(self.prompts, self.response_tokens, generator=generator, dtype=torch.float64)

    @cached_property
    def responses(self) -> list[tuple[int, ...]]:
        """Every response, as indices into the response tokens, in lexicographic order."""
        return list(itertools.product(range(self.response_tokens), repeat=self.response_length))

    @cached_property
    def rewards(self) -> torch.Tensor:
        """r(x, y) for every prompt and response: ``(prompts, responses)``."""
        index = torch.tensor(self.responses)
        return self.weights[:, index].sum(-1)

    def optimal_policy(self) -> torch.Tensor:
        """π*(y | x) ∝ exp r(x, y) over every response: ``(prompts, responses)``."""
        return torch.softmax(self.rewards, dim=-1)

    def load_tokenizer(self, cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocabulary = {token: index for index, token in enumerate(self.vocabulary)}
        backend = Tokenizer(models.WordLevel(vocabulary, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK)

    def reward(self, prompt: str, response: str) -> float:
        """The oracle: r(x, y) for a well-formed response; anything else (wrong length, foreign tokens)
        scores below every well-formed response."""
        prompt_index = int(prompt.strip()[1:])
        letters = response.split()
        if len(letters) != self.response_length or not set(letters) <= set(self._letters):
            return float(self.rewards[prompt_index].min()) - 1.0
        return float(sum(self.weights[prompt_index, ord(letter) - ord("a")] for letter in letters))

    def text(self, response: tuple[int, ...]) -> str:
        return " ".join(self._letters[token] for token in response)

    @property
    def _held_out_count(self) -> int:
        return round(self.held_out_responses * len(self.responses))

    @cached_property
    def held_out(self) -> list[list[int]]:
        """Each prompt's held-out responses (indices), fixed by ``reward_seed``: part of the task's definition."""
        rng = random.Random(self.reward_seed)
        return [sorted(rng.sample(range(len(self.responses)), self._held_out_count)) for _ in range(self.prompts)]

    def _candidates(self, prompt: int, held_out: bool) -> list[int]:
        """The responses a training (or, ``held_out``, a held-out) pair of ``prompt`` draws from."""
        if not self._held_out_count:
            return list(range(len(self.responses)))
        kept = set(self.held_out[prompt])
        return [index for index in range(len(self.responses)) if (index in kept) == held_out]

    def _pairs(self, per_prompt: int, rng: random.Random, held_out: bool) -> list[PromptPair]:
        """Distinct responses drawn uniformly (among the training or the held-out ones), ordered by a BT coin flip on
        their rewards."""
        rewards = self.rewards
        pairs = []
        for prompt in range(self.prompts):
            candidates = self._candidates(prompt, held_out)
            for _ in range(per_prompt):
                first, second = rng.sample(candidates, 2)
                margin = float(rewards[prompt, first] - rewards[prompt, second])
                chosen, rejected = (first, second) if rng.random() < 1 / (1 + math.exp(-margin)) else (second, first)
                pairs.append(PromptPair(f"p{prompt}", self.text(self.responses[chosen]), self.text(self.responses[rejected])))
        return pairs

    @property
    def dataset(self) -> str:
        return "synthetic_tokens"

    def sft_examples(self, seed: int, tokenizer: PreTrainedTokenizerBase, console: Console) -> SFTExamples:
        rng = random.Random(seed)
        train = self._pairs(self.train_pairs_per_prompt, rng, held_out=False)
        evaluation = self._pairs(self.eval_pairs_per_prompt, rng, held_out=True)
        return SFTExamples(
            [tokenize_pair(tokenizer, pair, self.tokenization) for pair in train],
            [tokenize_pair(tokenizer, pair, self.tokenization) for pair in evaluation],
        )

    def task_data(
        self,
        seed: int,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        sft: SFTExamples,
        cache_dir: Path,
        console: Console,
    ) -> TaskData:
        optimal = self.optimal_policy()
        console.print(
            f"seed {seed}: π* puts {float(optimal.max(-1).values.mean()):.3f} on each prompt's best response on average; "
            f"{len(self.responses)} responses per prompt"
        )
        judge = OracleJudge(self.reward, name="oracle")
        return TaskData(sft.train, sft.held_out, judges=(judge,), exact=self.exact_metrics(tokenizer, reference))

    def exact_metrics(self, tokenizer: PreTrainedTokenizerBase, reference: PreTrainedModel) -> ExactMetrics:
        """On the given prompts, by enumerating every well-formed response (seen in training or held out): KL(π*‖π)
        summed over the prompts (not averaged), split into the distance among well-formed responses and the
        probability leaked to malformed ones, and the mass on each prompt's best response. For π̃ = π / π(W) on the
        well-formed set W, KL(π*‖π) = KL(π*‖π̃) − log π(W). And by enumerating every response sampling can draw,
        KL(π‖π_ref) averaged over the prompts, exact (:func:`~expo_bench.lm.exact.sequence_kl`)."""
        max_new_tokens = self.evaluation.max_new_tokens if self.evaluation else self.response_length + 1
        token_id = tokenizer.get_vocab()
        index_of = {token_id[f"p{prompt}"]: prompt for prompt in range(self.prompts)}
        response_ids = [[*(token_id[self._letters[t]] for t in response), tokenizer.eos_token_id] for response in self.responses]
        optimal_policy = self.optimal_policy()
        best_responses = self.rewards.argmax(-1)

        def metrics(policy: PreTrainedModel, prompt_ids: Sequence[list[int]]) -> dict[str, float]:
            prompts = [index_of[ids[0]] for ids in prompt_ids]
            rows = [ids for ids in prompt_ids for _ in response_ids]
            logps = sequence_logps(policy, rows, response_ids * len(prompts), tokenizer.pad_token_id, 512)
            logps = logps.view(len(prompts), len(self.responses))
            optimal, best = optimal_policy[prompts], best_responses[prompts]
            well_formed = logps.logsumexp(-1, keepdim=True)  # log π(W)
            found = {
                metric_keys.KL_TO_TARGET.key: float((optimal * (optimal.log() - logps)).sum()),
                metric_keys.KL_WELL_FORMED.key: float((optimal * (optimal.log() - (logps - well_formed))).sum()),
                metric_keys.MALFORMED_LEAK.key: float(-well_formed.sum()),
                metric_keys.TOP_RESPONSE_MASS.key: float(logps.exp().gather(1, best[:, None]).mean()),
            }
            if enumerable(policy, max_new_tokens):  # else the metric is left out
                kl = sequence_kl(policy, reference, prompt_ids, max_new_tokens, tokenizer.eos_token_id)
                found[metric_keys.KL_EXACT.key] = statistics.fmean(kl)
            return found

        return metrics

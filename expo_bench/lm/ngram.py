"""A smoothed bigram model: the baseline an SFT model's held-out NLL per token is read against."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator, Sequence

from expo_bench.lm.tokenize import TokenizedPair

PRIOR_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""The Dirichlet prior weights α tried; the one with the lowest NLL on a tenth of the training examples is kept."""


def _transitions(examples: Sequence[TokenizedPair]) -> Iterator[tuple[int, int]]:
    """(previous token, token) for every token SFT scores: the response (chosen) tokens, the first one after the
    prompt's last token, exactly the positions of the SFT loss."""
    for example in examples:
        tokens = [*example.prompt_ids[-1:], *example.chosen_ids]
        yield from itertools.pairwise(tokens)


class Bigram:
    """P(b | a) = (c(a, b) + α·P(b)) / (c(a) + α), P(b) the add-one unigram: a bigram smoothed towards the unigram by
    a Dirichlet prior of weight α (MacKay & Peto 1995)."""

    def __init__(self, examples: Sequence[TokenizedPair], vocab_size: int) -> None:
        self.pairs = Counter(_transitions(examples))
        self.contexts: Counter[int] = Counter()
        self.unigrams: Counter[int] = Counter()
        for (previous, token), count in self.pairs.items():
            self.contexts[previous] += count
            self.unigrams[token] += count
        self.total, self.vocab_size = sum(self.unigrams.values()), vocab_size

    def nll(self, examples: Sequence[TokenizedPair], prior_weight: float) -> float:
        """Mean negative log-likelihood per scored token (nats) under prior weight α = ``prior_weight``."""
        total, count = 0.0, 0
        for previous, token in _transitions(examples):
            unigram = (self.unigrams[token] + 1) / (self.total + self.vocab_size)
            probability = (self.pairs[previous, token] + prior_weight * unigram) / (self.contexts[previous] + prior_weight)
            total -= math.log(probability)
            count += 1
        return total / count


def bigram_nll(train: Sequence[TokenizedPair], held_out: Sequence[TokenizedPair], vocab_size: int) -> float:
    """Held-out NLL per token of a bigram fitted on ``train``, its prior weight picked on a tenth of ``train``."""
    split = len(train) - max(1, len(train) // 10)
    fit, tune = train[:split], train[split:]
    on_fit = Bigram(fit, vocab_size)
    best = min(PRIOR_WEIGHTS, key=lambda weight: on_fit.nll(tune, weight))
    return Bigram(train, vocab_size).nll(held_out, best)

"""A byte-level BPE tokenizer fitted to a task's own training texts (the ``tokenizers`` library): a small model's cost
is dominated by a 50k-token vocabulary it cannot use, so a CPU-scale recipe fits a few thousand tokens to its corpus.
The fitted tokenizer is an artifact of the recipe, cached by the texts it was fitted on and its settings."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from expo_bench.cache import cached
from expo_bench.config_model import ConfigModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
"""The one special token: end of a document (EOS), start of an SFT example and padding, as in GPT-2."""


class TokenizerFit(ConfigModel):
    """``tokenizer: {fit: {vocab_size: 4096}}``: fit byte-level BPE (GPT-2's scheme) to the training texts."""

    vocab_size: int = Field(4096, ge=300)
    """Tokens in all, the 256 bytes and the end-of-text token included."""
    min_frequency: int = Field(2, ge=1)
    """A merge must occur at least this often in the texts."""

    def tokenizer(self, texts: Sequence[str], cache_dir: Path | None) -> PreTrainedTokenizerFast:
        """The tokenizer fitted to ``texts``, from the cache when these texts and settings were fitted before."""
        from transformers import PreTrainedTokenizerFast

        if cache_dir is None:
            serialized = self._fit(texts)
        else:
            corpus = hashlib.sha256()
            for text in texts:
                corpus.update(hashlib.sha256(text.encode("utf-8")).digest())
            key = {"texts": corpus.hexdigest(), "settings": self.model_dump(mode="json")}
            serialized, _ = cached(cache_dir, "fitted-tokenizer", key, lambda: self._fit(texts))
        from tokenizers import Tokenizer

        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(serialized),
            eos_token=END_OF_TEXT,
            bos_token=END_OF_TEXT,
            unk_token=END_OF_TEXT,
            model_max_length=1 << 30,  # the recipe's tokenization settings truncate, not the tokenizer
        )

    def _fit(self, texts: Sequence[str]) -> str:
        """The fitted tokenizer serialized (``tokenizer.json``): a string the cache stores as plain data."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer, length=len(texts))
        return str(tokenizer.to_str())


class FittedTokenizer(ConfigModel):
    """``tokenizer: {fit: {vocab_size: 4096}}`` in a recipe: byte-level BPE fitted to the task's training texts."""

    fit: TokenizerFit

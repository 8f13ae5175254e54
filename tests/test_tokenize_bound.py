"""Work bounded by max_length: a text is cut before it is tokenized, and the pair comes out exactly as tokenizing the
whole texts then truncating makes it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from expo_bench.lm.hh import load_hh_pairs
from expo_bench.lm.pairs import PromptPair
from expo_bench.lm.tokenize import (
    MARGIN_TOKENS,
    TokenizationConfig,
    TokenizedPair,
    eos_id,
    max_token_chars,
    tokenize_pair,
    truncate_pair,
)

SHARED = Path(__file__).parent.parent.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")


@pytest.fixture(scope="module", params=["gpt-neox-20b", "gpt2"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / request.param)


def whole_then_truncated(tokenizer: Any, pair: PromptPair, config: TokenizationConfig) -> TokenizedPair:
    """The reference: every text tokenized whole, then truncated."""
    eos = eos_id(tokenizer)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return truncate_pair(ids(pair.prompt), [*ids(pair.chosen), eos], [*ids(pair.rejected), eos], config, pair.label)


def long_texts(tokenizer: Any, span: int) -> dict[str, str]:
    """Texts longer than ``span``, where the bound cuts: real HH dialogues run together (cut mid-word, at random offsets),
    and synthetic lines made to be hard on the cut (one endless word, whitespace runs, the vocabulary's longest entries,
    decomposed accents that a normalizer composes, digits)."""
    pairs, _ = load_hh_pairs(str(SHARED / "hh-rlhf"), "helpful-base", "test")
    dialogues = "".join(pair.prompt + pair.chosen for pair in pairs)
    rng = random.Random(0)
    texts = {
        f"hh@{offset}": dialogues[offset : offset + span + 10_007] for offset in rng.sample(range(len(dialogues) - 2 * span), 4)
    }
    words = ["the", "a", "Assistant:", "\n\n", "  ", "----", "naïve", "e\u0301t\u00e9", "1234567", "!!", "\t"]
    texts |= {
        "one word": "a" * (span + 999),
        "whitespace runs": (" " * 700 + "x\n" * 3) * (span // 700),
        "longest tokens": (max(tokenizer.get_vocab(), key=len) + "b") * (span // 300),
        "random words": "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(span // 3)),
        "decomposed accents": "e\u0301" * (span + 1),
        "digits": "".join(rng.choice("0123456789 ") for _ in range(span + 5)),
    }
    return texts


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_a_text_cut_before_tokenizing_gives_the_pair_of_the_whole_text(tokenizer: Any, mode: str) -> None:
    config = TokenizationConfig(max_length=64, max_prompt_length=32, prompt_truncation=mode)
    short = "Human: is this short?\n\nAssistant:"
    for name, text in long_texts(tokenizer, (config.max_length + MARGIN_TOKENS) * max_token_chars(tokenizer)).items():
        for pair in (PromptPair(short, text, "no"), PromptPair(short, "no", text), PromptPair(text, "yes", "no")):
            assert tokenize_pair(tokenizer, pair, config) == whole_then_truncated(tokenizer, pair, config), name


MEASURE = """
import resource, sys
from transformers import AutoTokenizer
from expo_bench.lm.pairs import PromptPair
from expo_bench.lm.tokenize import MARGIN_TOKENS, TokenizationConfig, tokenize_pair
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
line = "word " * (10 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pair = tokenize_pair(tokenizer, PromptPair("Human: hi\\n\\nAssistant:", line, "ok"), TokenizationConfig())
assert len(pair.chosen_ids) + len(pair.prompt_ids) == 512 and pair.response_truncated
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_50_mb_response_line_takes_megabytes_not_gigabytes(tokenizer: Any) -> None:
    """Tokenized whole, a 50 MiB line took 7 GB of RSS (10 MiB: 1.4 GB and 8 s); measured in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, tokenizer.name_or_path], capture_output=True, text=True, check=True, timeout=120
    )
    assert int(result.stdout) < 200 << 10  # KiB: under 200 MiB more than before the call

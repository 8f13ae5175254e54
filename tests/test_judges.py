"""Judges: reward comparisons, a Hugging Face reward model, and the LLM judge against a real local HTTP server."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_server import ChatServer, Scripted, first_bias_draw, serving
from conftest import SHARED_DATA, missing
from network import free_port
from pydantic import TypeAdapter, ValidationError

from expo_bench.errors import UserError
from expo_bench.evaluation.judges import JudgeConfig, OracleJudge, RewardModelJudge, RewardModelJudgeConfig
from expo_bench.evaluation.llm_judge import (
    DPO_DIALOGUE_TEMPLATE,
    JudgeError,
    LLMJudge,
    LLMJudgeConfig,
    candidate_position,
    judged_both_ways,
    parse_choice,
)
from expo_bench.evaluation.metrics import position_bias_summary
from expo_bench.evaluation.reward_models import HFRewardModel
from expo_bench.evaluation.types import Comparison

GPT2 = SHARED_DATA / "tokenizers" / "gpt2"
KEY = "sk-test-S3CRET-0123456789abcdef"
KEY_ENV = "EXPO_BENCH_TEST_JUDGE_KEY"


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with serving() as chat:
        yield chat


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def llm_config(server: ChatServer, **overrides: Any) -> LLMJudgeConfig:
    """One order per comparison unless ``swap`` is given: the request counts below are exact."""
    settings: dict[str, Any] = {"base_url": server.base_url, "model": "judge-1", "api_key_env": KEY_ENV, "backoff": 0.001}
    return LLMJudgeConfig(**{**settings, "max_retries": 3, "timeout": 5, "swap": 0.0, **overrides})


def comparisons(n: int, tag: str = "") -> list[Comparison]:
    """The candidate is the longer response (so wins) for even i, the shorter (so loses) for odd i."""
    long, short = "a long and detailed answer", "short"
    return [Comparison(f"question {tag}{i}?", *((long, short) if i % 2 == 0 else (short, long))) for i in range(n)]


def expected(n: int) -> list[float]:
    return [1.0 if i % 2 == 0 else 0.0 for i in range(n)]


# --- the LLM judge ----------------------------------------------------------------------------------------


def test_llm_judge_outcomes_follow_the_randomized_order_and_the_cache_answers_reruns(server: ChatServer, tmp_path: Path) -> None:
    config = llm_config(server, max_tokens=64)
    items = comparisons(16)
    verdicts = LLMJudge(config, tmp_path, seed=0).judge(items)

    assert [verdict.outcome for verdict in verdicts] == expected(16)
    positions = [verdict.detail["candidate_position"] for verdict in verdicts]
    assert set(positions) == {"A", "B"}
    assert all(verdict.detail["choice"] in "AB" and "More helpful:" in verdict.detail["answer"] for verdict in verdicts)
    assert len(server.requests) == 16
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"], body["messages"][0]["role"]) == ("judge-1", 0.0, 64, "user")
    first = next(i for i, position in enumerate(positions) if position == "B")
    a, b = items[first].baseline, items[first].candidate
    sent = [request["body"]["messages"][0]["content"] for request in server.requests]
    assert DPO_DIALOGUE_TEMPLATE.format(prompt=items[first].prompt, response_a=a, response_b=b) in sent

    assert LLMJudge(config, tmp_path, seed=0).judge(items) == verdicts
    assert len(server.requests) == 16, "a rerun must be answered from the cache"
    reseeded = LLMJudge(config, tmp_path, seed=1).judge(items)
    moved = sum(
        old.detail["candidate_position"] != new.detail["candidate_position"] for old, new in zip(verdicts, reseeded, strict=True)
    )
    assert 0 < moved < 16 and len(server.requests) == 16 + moved, "the cache is keyed by the texts in their A/B order"
    assert [verdict.outcome for verdict in reseeded] == expected(16)
    LLMJudge(llm_config(server, model="judge-2"), tmp_path, seed=0).judge(items[:3])
    assert len(server.requests) == 16 + moved + 3, "another model is another judge"


def sent_contents(server: ChatServer) -> list[str]:
    return [request["body"]["messages"][0]["content"] for request in server.requests]


def test_swapped_pairs_are_judged_in_both_orders_and_cached(server: ChatServer, tmp_path: Path) -> None:
    items = comparisons(40)
    swapped = [judged_both_ways(0, item, 0.5) for item in items]
    assert 10 <= sum(swapped) <= 30
    verdicts = LLMJudge(llm_config(server, swap=0.5), tmp_path, seed=0).judge(items)
    assert len(server.requests) == 40 + sum(swapped)
    assert [verdict.outcome for verdict in verdicts] == expected(40), "the verdict is the seeded order's"
    sent = sent_contents(server)
    for item, verdict, both in zip(items, verdicts, swapped, strict=True):
        asked = [
            DPO_DIALOGUE_TEMPLATE.format(prompt=item.prompt, response_a=a, response_b=b)
            for a, b in ((item.candidate, item.baseline), (item.baseline, item.candidate))
        ]
        assert [text in sent for text in asked].count(True) == (2 if both else 1)
        if both:  # the longer response wins in both orders: a consistent judge without position bias
            assert verdict.orders == (verdict.outcome, verdict.outcome)
            assert {verdict.detail["choice"], verdict.detail["swap_choice"]} == {"A", "B"}
        else:
            assert verdict.orders is None and "swap_choice" not in verdict.detail

    assert LLMJudge(llm_config(server, swap=0.5), tmp_path, seed=0).judge(items) == verdicts
    assert LLMJudge(llm_config(server, swap=0.0), tmp_path, seed=0).judge(items)[0].orders is None
    assert len(server.requests) == 40 + sum(swapped), "reruns, and fewer swaps, are answered from the cache"
    full = LLMJudge(llm_config(server, swap=1.0), tmp_path, seed=0).judge(items)
    assert len(server.requests) == 80, "raising the share asks only the pairs not yet judged both ways"
    assert all(verdict.orders is not None for verdict in full)


def test_a_known_position_bias_is_measured_within_its_interval(tmp_path: Path) -> None:
    bias, n = 0.3, 300
    items = comparisons(n)
    with serving(first_bias=bias) as server:
        verdicts = LLMJudge(llm_config(server, swap=1.0, max_concurrency=8), tmp_path, seed=0).judge(items)
        assert len(server.requests) == 2 * n
    first, second = (torch.tensor([verdict.orders[side] for verdict in verdicts if verdict.orders]) for side in (0, 1))
    summary = position_bias_summary(first, second)
    assert summary["swapped"] == n
    # exactly: a pair is inconsistent when the order showing the longer response second draws the bias
    inconsistent = sum(
        first_bias_draw(
            DPO_DIALOGUE_TEMPLATE.format(prompt=item.prompt, response_a=min(texts, key=len), response_b=max(texts, key=len))
        )
        < bias
        for item in items
        for texts in [(item.candidate, item.baseline)]
    )
    assert summary["self_consistency"] == pytest.approx(1 - inconsistent / n, abs=1e-12)
    assert summary["first_position_wins"] == pytest.approx((n + inconsistent) / (2 * n), abs=1e-12)
    # and statistically: the scripted truth lies within the 95% intervals
    assert summary["first_position_wins_ci_low"] <= (1 + bias) / 2 <= summary["first_position_wins_ci_high"]
    assert summary["self_consistency_ci_low"] <= 1 - bias <= summary["self_consistency_ci_high"]
    assert summary["first_position_wins_ci_low"] > 0.5, "the bias is detected"

    ties = LLMJudge(llm_config(server, swap=1.0, inconsistent_as_tie=True), tmp_path, seed=0).judge(items)
    for plain, tied in zip(verdicts, ties, strict=True):
        assert plain.orders is not None and tied.orders == plain.orders
        consistent = plain.orders[0] == plain.orders[1]
        assert tied.outcome == (plain.orders[0] if consistent else 0.5), "MT-Bench: an inconsistent pair is a tie"
    with pytest.raises(ValidationError, match="inconsistent_as_tie needs pairs judged in both orders"):
        llm_config(server, swap=0.0, inconsistent_as_tie=True)


def test_candidate_position_is_a_deterministic_seeded_coin() -> None:
    items = comparisons(64)
    positions = [candidate_position(0, item) for item in items]
    assert positions == [candidate_position(0, item) for item in items]
    assert 20 <= positions.count("A") <= 44
    assert positions != [candidate_position(1, item) for item in items]


@pytest.mark.parametrize(
    ("answer", "choice"),
    [
        ("Comparison: A is more specific.\nMore helpful: A", "A"),
        ('Comparison: B.\nMore helpful: "B"', "B"),
        ("More helpful: 'A'.", "A"),
        ("  More helpful: B.  \n", "B"),
        ("More helpful: “A”", "A"),
        ("More helpful: C", None),
        ("More helpful: A or B", None),
        ("More helpful: AB", None),
        ('More helpful: "A', None),
        ("More helpful: A\nMore helpful: A", None),
        ("More helpful: A\nMore helpful: B", None),
        ("**More helpful:** A", None),
        ("more helpful: A", None),
        ("Comparison: A is better. More helpful: A", None),
        ("The answer is A", None),
        ("", None),
    ],
)
def test_parse_choice_is_strict(answer: str, choice: str | None) -> None:
    assert parse_choice(answer) == choice


def test_parse_choice_label_follows_the_template() -> None:
    assert parse_choice("Comparison: ...\nPreferred: B", "Preferred") == "B"
    assert parse_choice("More helpful: B", "Preferred") is None


def test_unparseable_answers_are_nan_never_guessed(server: ChatServer, tmp_path: Path) -> None:
    items = [*comparisons(4), *comparisons(3, tag="GARBAGE ")]
    verdicts = LLMJudge(llm_config(server), tmp_path, seed=0).judge(items)
    assert [verdict.outcome for verdict in verdicts[:4]] == expected(4)
    assert all(math.isnan(verdict.outcome) and verdict.detail["choice"] is None for verdict in verdicts[4:])
    assert verdicts[4].detail["answer"] == "Both responses are fine, I cannot pick one."


def test_identical_responses_tie_without_a_request(server: ChatServer, tmp_path: Path) -> None:
    [verdict] = LLMJudge(llm_config(server), tmp_path, seed=0).judge([Comparison("q?", "same", "same")])
    assert verdict.outcome == 0.5 and verdict.detail["answer"] is None and not server.requests


def test_429_5xx_and_timeouts_are_retried(server: ChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.script = [Scripted(429, {"Retry-After": "0.3"}), Scripted(500), Scripted(503), Scripted(200, sleep=1.5)]
    config = llm_config(server, max_concurrency=1, timeout=0.5, max_retries=4)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        verdicts = LLMJudge(config, tmp_path, seed=0).judge(comparisons(2))
    assert [verdict.outcome for verdict in verdicts] == expected(2)
    assert len(server.requests) == 6  # 4 failures, then both answered
    assert time.monotonic() - start >= 0.3, "Retry-After is honoured over the (tiny) backoff"
    assert all(f"HTTP {status}" in caplog.text for status in (429, 500, 503)) and "TimeoutError" in caplog.text


def test_a_redirect_is_never_followed_so_the_key_stays_home(server: ChatServer, tmp_path: Path) -> None:
    with serving() as elsewhere:  # another origin (another port) that would answer like a judge
        for status in (301, 302, 307, 308):
            server.script = [Scripted(status, {"Location": f"{elsewhere.base_url}/chat/completions"})]
            with pytest.raises(JudgeError, match=rf"HTTP {status} .*redirects are not followed.*pointed to {elsewhere.base_url}"):
                LLMJudge(llm_config(server, max_concurrency=1), tmp_path, seed=0).judge(comparisons(1))
        assert not elsewhere.requests, "the other origin got no request, so no key and no verdict"
    assert [request["authorization"] for request in server.requests] == [f"Bearer {KEY}"] * 4
    assert not list(tmp_path.glob("*.json")), "nothing cached from a redirect"


def test_a_reply_is_read_up_to_a_cap(server: ChatServer, tmp_path: Path) -> None:
    from expo_bench.evaluation.llm_judge import MAX_RESPONSE_BYTES

    server.script = [Scripted(200, body=" " * (MAX_RESPONSE_BYTES + 10))]
    with pytest.raises(JudgeError, match=f"more than {MAX_RESPONSE_BYTES} bytes"):
        LLMJudge(llm_config(server, max_concurrency=1), tmp_path, seed=0).judge(comparisons(1))


def test_the_timeout_bounds_the_whole_request_not_each_read(
    server: ChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = [Scripted(200, body='{"choices": []}' * 4, trickle=0.1)]  # every byte in time, the reply never
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        verdicts = LLMJudge(llm_config(server, max_concurrency=1, timeout=0.5), tmp_path, seed=0).judge(comparisons(1))
    assert time.monotonic() - start < 2.0 and verdicts[0].outcome == 1.0
    assert "over 0.5 s in all" in caplog.text and len(server.requests) == 2


def test_retry_after_is_capped(server: ChatServer, tmp_path: Path) -> None:
    server.script = [Scripted(429, {"Retry-After": "3600"}), Scripted(503, {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})]
    start = time.monotonic()
    verdicts = LLMJudge(llm_config(server, max_retry_after=0.2), tmp_path, seed=0).judge(comparisons(1))
    assert verdicts[0].outcome == 1.0 and 0.4 <= time.monotonic() - start < 3.0


def test_an_unreachable_server_fails_clearly_after_the_retries(tmp_path: Path) -> None:
    port = free_port()
    config = LLMJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None, max_retries=2, backoff=0.001)
    with pytest.raises(
        JudgeError, match=rf"no answer from http://127.0.0.1:{port}/v1/chat/completions .*gave up after 3 attempts"
    ):
        LLMJudge(config, tmp_path, seed=0).judge(comparisons(1))


def test_the_endpoint_check_names_what_to_do_before_any_work(server: ChatServer, tmp_path: Path) -> None:
    LLMJudge(llm_config(server, model="local-judge"), tmp_path, seed=0).check_endpoint()  # reachable, model served
    assert server.requests == []  # the check sends no judgment
    with pytest.raises(JudgeError, match=r"serves local-judge, not 'judge-1': set task\.evaluation\.judge\.model"):
        LLMJudge(llm_config(server), tmp_path, seed=0).check_endpoint()
    unreachable = LLMJudgeConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", api_key_env=None)
    with pytest.raises(JudgeError) as error:
        LLMJudge(unreachable, tmp_path, seed=0).check_endpoint()
    message = str(error.value)
    assert "is not reachable" in message and "vllm serve" in message and "python tests/chat_server.py" in message
    assert "--set task.evaluation=null" in message


@pytest.mark.parametrize("status", [400, 401, 404])
def test_other_4xx_fail_at_once_naming_status_and_url(server: ChatServer, tmp_path: Path, status: int) -> None:
    server.script = [Scripted(status)]
    with pytest.raises(JudgeError, match=rf"HTTP {status} .* from {re.escape(server.base_url)}/chat/completions") as error:
        LLMJudge(llm_config(server, max_concurrency=1), tmp_path, seed=0).judge(comparisons(3))
    assert len(server.requests) == 1 and "0 of 3 new answers are cached" in str(error.value)


def test_a_missing_api_key_is_a_user_error_naming_the_variable(
    server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=KEY_ENV):
        LLMJudge(llm_config(server), tmp_path, seed=0).judge(comparisons(2))
    assert not server.requests
    LLMJudge(llm_config(server, api_key_env=None), tmp_path, seed=0).judge(comparisons(1))
    assert server.requests[0]["authorization"] is None


def test_an_interrupted_judging_keeps_its_answers_and_resumes(server: ChatServer, tmp_path: Path) -> None:
    server.fail_after = 3
    config = llm_config(server, max_concurrency=2, max_retries=1)
    with pytest.raises(JudgeError, match="HTTP 500") as error:
        LLMJudge(config, tmp_path, seed=0).judge(comparisons(8))
    assert "3 of 8 new answers are cached" in str(error.value)
    assert len(list(tmp_path.glob("*.json"))) == 3 and not list(tmp_path.glob(".*")), "whole files only, no temporaries"

    server.fail_after, sent = None, len(server.requests)
    verdicts = LLMJudge(config, tmp_path, seed=0).judge(comparisons(8))
    assert [verdict.outcome for verdict in verdicts] == expected(8)
    assert len(server.requests) - sent == 5


def test_concurrency_is_bounded_and_progress_reported(server: ChatServer, tmp_path: Path) -> None:
    server.delay = 0.1
    progress: list[int] = []
    judge = LLMJudge(llm_config(server, max_concurrency=3), tmp_path, seed=0)
    assert [verdict.outcome for verdict in judge.judge(comparisons(12), progress.append)] == expected(12)
    assert 2 <= server.max_active <= 3
    assert progress == list(range(1, 13))


def test_the_api_key_appears_nowhere(server: ChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = llm_config(server)
    judge = LLMJudge(config, tmp_path, seed=0)
    server.script = [Scripted(429, {"Retry-After": "0"})]
    with caplog.at_level(logging.DEBUG):
        verdicts = judge.judge(comparisons(4))
        server.script = [Scripted(401)]
        with pytest.raises(JudgeError) as error:
            judge.judge(comparisons(1, tag="new "))
    assert server.requests[-1]["authorization"] == f"Bearer {KEY}"
    assert "Incorrect API key: Bearer [API key]" in str(error.value)
    texts = [
        str(error.value),
        repr(error.value),
        caplog.text,
        repr(config),
        config.model_dump_json(),
        repr(judge),
        json.dumps([verdict.detail for verdict in verdicts]),
        *(path.read_text() for path in tmp_path.iterdir()),
    ]
    assert len(texts) == 7 + 4 and not [text for text in texts if KEY in text or KEY[8:20] in text]


def chat_reply(content: str, usage: str = "{}") -> str:
    """A chat completion's body as text, so that a test can put in it what ``json.dumps`` would never write."""
    return f'{{"choices": [{{"message": {{"role": "assistant", "content": {content}}}}}], "usage": {usage}}}'


def test_hostile_replies_are_refused_or_answered_never_a_crash(server: ChatServer, tmp_path: Path) -> None:
    nested = "[" * 200_000 + "]" * 200_000  # under the 1 MiB cap; deeper than json's recursion
    server.script = [Scripted(200, body=chat_reply(nested))]
    with pytest.raises(JudgeError, match=r"answered without choices\[0\]\.message\.content: \{\"choices\": \[\{"):
        LLMJudge(llm_config(server, max_concurrency=1), tmp_path, seed=0).judge(comparisons(1))

    huge_count = chat_reply(json.dumps("Comparison: fine.\nMore helpful: A"), usage='{"total_tokens": ' + "9" * 5000 + "}")
    server.script = [Scripted(200, body=huge_count)]
    [verdict] = LLMJudge(llm_config(server, max_concurrency=1), tmp_path, seed=0).judge(comparisons(1, tag="usage "))
    assert verdict.detail["choice"] == "A" and not math.isnan(verdict.outcome)

    for listing, problem in [('{"data": 5}', "without a list of models in data"), (nested, "did not answer with JSON")]:
        server.listing = listing
        with pytest.raises(JudgeError, match=problem):
            LLMJudge(llm_config(server), tmp_path, seed=0).check_endpoint()


def test_a_key_the_judge_echoes_is_written_nowhere(server: ChatServer, tmp_path: Path) -> None:
    echo = chat_reply(json.dumps(f"You sent Authorization: Bearer {KEY}\nComparison: fine.\nMore helpful: A"))
    server.script = [Scripted(200, body=echo)]
    [verdict] = LLMJudge(llm_config(server), tmp_path, seed=0).judge(comparisons(1))
    assert verdict.detail["answer"].startswith("You sent Authorization: Bearer [API key]\n") and verdict.detail["choice"] == "A"
    [cached] = tmp_path.iterdir()
    assert "Bearer [API key]" in cached.read_text() and KEY not in cached.read_text()


def test_llm_judge_config_validates_and_builds(tmp_path: Path) -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(JudgeConfig)
    config = adapter.validate_python({"kind": "llm", "model": "gpt-4-0314", "base_url": "http://localhost:8000/v1/"})
    assert isinstance(config, LLMJudgeConfig) and config.base_url == "http://localhost:8000/v1"
    judge = config.build(tmp_path, seed=3)
    assert (judge.name, judge.url, judge.seed, judge.cache_dir.parent) == (
        "llm:gpt-4-0314",
        config.base_url + "/chat/completions",
        3,
        tmp_path,
    )
    assert isinstance(adapter.validate_python({"kind": "reward_model", "name_or_path": "x"}), RewardModelJudgeConfig)

    with pytest.raises(ValidationError, match="did you mean 'model'"):
        LLMJudgeConfig.model_validate({"modle": "m"})
    with pytest.raises(
        ValidationError, match=r"expected the fields \['prompt', 'response_a', 'response_b'\], got \['prompt', 'response_a'\]"
    ):
        LLMJudgeConfig(model="m", template="{prompt} {response_a}")
    with pytest.raises(ValidationError, match="literal braces"):
        LLMJudgeConfig(model="m", template="{prompt} {response_a} {response_b} {")
    with pytest.raises(ValidationError, match="base_url"):
        LLMJudgeConfig(model="m", base_url="api.openai.com/v1")
    custom = LLMJudgeConfig(model="m", template="Q {prompt}\nA {response_a}\nB {response_b}\nJSON {{}}")
    assert custom.template.format(prompt="p", response_a="a", response_b="b") == "Q p\nA a\nB b\nJSON {}"


# --- reward judges ----------------------------------------------------------------------------------------


def test_oracle_judge_compares_rewards_and_ties_on_equal() -> None:
    judge = OracleJudge(lambda prompt, response: float(len(response) - len(prompt)))
    verdicts = judge.judge([Comparison("p", "long", "s"), Comparison("p", "s", "long"), Comparison("p", "abc", "xyz")])
    assert [verdict.outcome for verdict in verdicts] == [1.0, 0.0, 0.5]
    assert verdicts[0].detail == {"candidate_reward": 3.0, "baseline_reward": 0.0} and judge.name == "oracle"
    assert math.isnan(OracleJudge(lambda prompt, response: math.nan).judge([Comparison("p", "a", "b")])[0].outcome)


class CountingRewardModel:
    name = "good-counter"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, texts: Sequence[str]) -> list[float]:
        self.calls.append(list(texts))
        return [float(text.count("good")) for text in texts]


def test_reward_model_judge_scores_prompt_and_response_together() -> None:
    model = CountingRewardModel()
    judge = RewardModelJudge(model)
    verdicts = judge.judge(
        [Comparison("good? ", "good good", "good"), Comparison("q ", "bad", "good"), Comparison("q ", "x", "y")]
    )
    assert [verdict.outcome for verdict in verdicts] == [1.0, 0.0, 0.5] and judge.name == "good-counter"
    assert model.calls == [["good? good good", "q bad", "q x", "good? good", "q good", "q y"]]
    assert verdicts[0].detail == {"candidate_reward": 3.0, "baseline_reward": 2.0}


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not GPT2.is_dir():
        pytest.skip(missing(GPT2))
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(GPT2))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    config.num_labels = 1
    path = tmp_path_factory.mktemp("reward-model")
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_reward_model_scores_batches_like_single_texts_and_keeps_the_end(tiny_reward_model: Path) -> None:
    model = HFRewardModel(str(tiny_reward_model), batch_size=2, max_length=16)
    texts = ["Human: hi\n\nAssistant: hello there, friend", "short", "a medium length text to score"]
    batched = model.score(texts)
    assert batched == pytest.approx([model.score([text])[0] for text in texts], abs=1e-5)
    assert len(set(batched)) == 3 and not model.model.training

    long = " ".join(f"word{i}" for i in range(40))
    ids = model.tokenizer(long)["input_ids"]
    assert len(ids) > 16
    with torch.no_grad():
        tail = model.model(input_ids=torch.tensor([ids[-16:]])).logits[0, 0].item()
    assert model.score([long]) == pytest.approx([tail], abs=1e-5)

    verdicts = RewardModelJudge(model).judge([Comparison("Q: ", texts[0], texts[1]), Comparison("Q: ", texts[1], texts[1])])
    rewards = verdicts[0].detail
    assert verdicts[0].outcome == (1.0 if rewards["candidate_reward"] > rewards["baseline_reward"] else 0.0)
    assert verdicts[1].outcome == 0.5


def test_reward_model_judge_config_builds_an_hf_reward_model(tiny_reward_model: Path, tmp_path: Path) -> None:
    judge = RewardModelJudgeConfig(name_or_path=str(tiny_reward_model), batch_size=4, max_length=32).build(tmp_path, seed=0)
    assert judge.name == str(tiny_reward_model)
    assert isinstance(judge.model, HFRewardModel) and (judge.model.batch_size, judge.model.max_length) == (4, 32)


def test_hf_reward_model_needs_one_output(tmp_path: Path) -> None:
    if not GPT2.is_dir():
        pytest.skip(missing(GPT2))
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(GPT2))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1, n_head=2)
    config.num_labels = 2
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="one output, this one has 2"):
        HFRewardModel(str(tmp_path))

"""An LLM judge over any OpenAI-compatible chat-completions endpoint (OpenAI, a local vLLM server, ...).

Each comparison puts the candidate at position A or B by a hash of the seed and the texts, so the order is
random across comparisons (LLM judges favour one position) yet the same on every rerun. A share ``swap`` of the
comparisons, chosen the same way, is also judged in the other order, which measures that position bias and the
judge's self-consistency (:func:`expo_bench.evaluation.metrics.position_bias_summary`). Every answer is
written to disk as soon as it arrives, keyed by a hash of everything the request depends on, so an
interrupted judging resumes without asking twice. The API key is read from the environment when sending and
kept out of logs, errors and the cache.

Transport is the standard library's ``http.client``, one connection per request, so that the client controls what
matters for a request that carries a key: no redirect is followed (a 3xx is an error: the key never reaches another
address and another server's reply is never a verdict), a reply is read up to :data:`MAX_RESPONSE_BYTES`, and
``timeout`` bounds the whole request (a watchdog shuts the socket), not each read.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import ssl
import string
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from expo_bench.cache import atomic_write
from expo_bench.config_model import ConfigModel
from expo_bench.errors import UserError
from expo_bench.evaluation.types import Comparison, Verdict
from expo_bench.reporting import Done

log = logging.getLogger(__name__)

Position = Literal["A", "B"]

MAX_RESPONSE_BYTES = 1 << 20
"""The most of a reply that is read: a chat completion of a few hundred tokens is a few KiB."""


class JudgeError(UserError):
    """The judge's endpoint refused a request, or kept failing after every retry."""


class _Transient(Exception):
    """A failure worth retrying: HTTP 429 or 5xx, a timeout, a dropped connection."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def candidate_position(seed: int, comparison: Comparison) -> Position:
    """Where the candidate goes, A or B: a fair coin per comparison, fixed by the seed and the texts."""
    texts = json.dumps([seed, comparison.prompt, comparison.candidate, comparison.baseline])
    return "A" if hashlib.sha256(texts.encode()).digest()[0] % 2 == 0 else "B"


def judged_both_ways(seed: int, comparison: Comparison, fraction: float) -> bool:
    """Whether a comparison is judged in both orders: a uniform draw per comparison, fixed by the seed and the texts
    (independent of :func:`candidate_position`), below ``fraction``; raising the fraction keeps every pair already
    judged both ways."""
    texts = json.dumps([seed, "swap", comparison.prompt, comparison.candidate, comparison.baseline])
    return int.from_bytes(hashlib.sha256(texts.encode()).digest()[:8], "big") / 2**64 < fraction


def _other(position: Position) -> Position:
    return "B" if position == "A" else "A"


def _in_order(comparison: Comparison, position: Position) -> tuple[str, str, str]:
    """(prompt, response A, response B) with the candidate at ``position``."""
    c = comparison
    return (c.prompt, c.candidate, c.baseline) if position == "A" else (c.prompt, c.baseline, c.candidate)


def parse_choice(answer: str, label: str = "More helpful") -> Position | None:
    """The choice on the answer's one line ``<label>: A`` (or ``"A"``, ``A.``); None unless exactly one line matches."""
    pattern = re.compile(rf"""\s*{re.escape(label)}:\s*(?:(?P<quote>["']?)(?P<plain>[AB])(?P=quote)|“(?P<curly>[AB])”)\.?\s*""")
    matches = [match for line in answer.splitlines() if (match := pattern.fullmatch(line))]
    if len(matches) != 1:
        return None
    choice = matches[0]["plain"] or matches[0]["curly"]
    return "A" if choice == "A" else "B"


def decode_json(raw: bytes | str) -> object:
    """``raw`` as JSON, or :class:`ValueError` for anything a hostile reply can make of the decoder: nesting deeper than
    it can recurse is not JSON to us, and an integer longer than Python converts (a usage count nobody reads) is a
    float instead, so it voids nothing."""
    limit = sys.get_int_max_str_digits()
    try:
        return json.loads(raw, parse_int=lambda digits: int(digits) if not limit or len(digits) <= limit else float(digits))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


DPO_DIALOGUE_TEMPLATE = (
    "For the following query to a chatbot, which response is more helpful?\n"
    "Query: {prompt}\n"
    "Response A:\n{response_a}\n"
    "Response B:\n{response_b}\n"
    "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
    'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. '
    "Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    'More helpful: <"A" or "B">'
)
"""The DPO paper's GPT-4 helpfulness prompt for dialogue (Rafailov et al. 2023, Appendix C.2)."""

TEMPLATE_FIELDS = {"prompt", "response_a", "response_b"}


class LLMJudgeConfig(ConfigModel):
    """A chat model behind an OpenAI-compatible endpoint (``{base_url}/chat/completions``) picks the better response.

    The API key is read from the environment variable ``api_key_env`` when sending (null: no authentication).
    Every answer is cached under the run's cache folder, so an interrupted evaluation resumes without paying twice.
    """

    kind: Literal["llm"] = "llm"
    base_url: str = Field("https://api.openai.com/v1", pattern=r"^https?://")
    model: str = Field(min_length=1)
    api_key_env: str | None = "OPENAI_API_KEY"
    template: str = DPO_DIALOGUE_TEMPLATE
    """The user message: ``{prompt}``, ``{response_a}`` and ``{response_b}`` are filled in (write literal braces twice)."""
    choice_label: str = Field("More helpful", min_length=1)
    """The answer must hold exactly one line ``<choice_label>: A`` or ``... B`` (the DPO summarization prompt: ``Preferred``)."""
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, gt=0)
    max_concurrency: int = Field(4, gt=0)
    max_retries: int = Field(6, ge=0)
    """Retries of a request after HTTP 429, 5xx, a timeout or a connection error."""
    backoff: float = Field(1.0, ge=0)
    """Seconds before the first retry, doubling with each (a server's Retry-After takes precedence)."""
    timeout: float = Field(120.0, gt=0)
    """Seconds for one whole request: connecting, sending, waiting and reading the reply."""
    max_retry_after: float = Field(60.0, ge=0)
    """The longest pause before a retry: a server's Retry-After above it is cut to it."""
    swap: float = Field(0.1, ge=0, le=1)
    """The share of comparisons also judged with the two responses' order swapped (each comparison by a seeded coin, so
    the share is close to it; 1: every comparison, a full audit): measures the judge's position bias and
    self-consistency. The verdict stays the first order's unless ``inconsistent_as_tie``."""
    inconsistent_as_tie: bool = False
    """A pair judged both ways whose two answers pick different responses counts as a tie (MT-Bench's convention,
    Zheng et al. 2023); one with an unparseable answer is invalid."""
    added_later: ClassVar[frozenset[str]] = frozenset({"swap", "inconsistent_as_tie"})

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, base_url: str) -> str:
        return base_url.rstrip("/")

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        except ValueError as error:
            raise ValueError(f"not a format string ({error}); write literal braces as {{{{ and }}}}") from None
        if fields != TEMPLATE_FIELDS:
            raise ValueError(f"expected the fields {sorted(TEMPLATE_FIELDS)}, got {sorted(fields)}")
        return template

    @model_validator(mode="after")
    def _ties_need_swaps(self) -> LLMJudgeConfig:
        if self.inconsistent_as_tie and self.swap == 0:
            raise ValueError("inconsistent_as_tie needs pairs judged in both orders: set swap above 0 (1: all of them)")
        return self

    def build(self, cache_dir: Path, seed: int) -> LLMJudge:
        return LLMJudge(self, cache_dir / "llm-judge", seed)

    def check_reachable(self, cache_dir: Path) -> None:
        """Its endpoint answers and serves its model (a :class:`JudgeError` saying what failed otherwise)."""
        self.build(cache_dir, seed=0).check_endpoint()


class LLMJudge:
    """Asks a chat model which of two responses is better; built by :meth:`LLMJudgeConfig.build`.

    Verdict details: ``candidate_position`` (A or B), the raw ``answer`` and the parsed ``choice`` (None when
    the answer does not follow the format: outcome NaN); for a pair judged both ways also ``swap_choice`` and
    ``swap_answer`` (the other order's), with :attr:`Verdict.orders`. Identical responses tie without a request
    (answer None).
    """

    def __init__(self, config: LLMJudgeConfig, cache_dir: Path, seed: int) -> None:
        self.config, self.cache_dir, self.seed = config, cache_dir, seed
        self.name = f"llm:{config.model}"
        self.gives_rewards = False
        self.url = f"{config.base_url}/chat/completions"

    def judge(self, comparisons: Sequence[Comparison], done: Done | None = None) -> list[Verdict]:
        # the candidate's position per comparison: the seeded one, then for a pair judged both ways the other
        orders = [
            [p, _other(p)] if c.candidate != c.baseline and judged_both_ways(self.seed, c, self.config.swap) else [p]
            for c, p in ((c, candidate_position(self.seed, c)) for c in comparisons)
        ]
        keys = [  # identical responses tie without a question
            [] if c.candidate == c.baseline else [self._key(*_in_order(c, p)) for p in positions]
            for c, positions in zip(comparisons, orders, strict=True)
        ]
        answers: dict[str, str] = {}
        to_ask: dict[str, tuple[str, str, str]] = {}
        waiting: dict[str, list[int]] = {}  # an unanswered question -> the comparisons that wait for it
        for index, (c, positions) in enumerate(zip(comparisons, orders, strict=True)):
            for key, position in zip(keys[index], positions, strict=False):
                if key not in answers and key not in to_ask:
                    cached = self._load(key)
                    if cached is None:
                        to_ask[key] = _in_order(c, position)
                    else:
                        answers[key] = cached
                if key in to_ask:
                    waiting.setdefault(key, []).append(index)
        log.info(
            "%s: %d comparisons (%d in both orders), %d answers cached, %d to ask %s",
            self.name,
            len(comparisons),
            sum(len(question_keys) == 2 for question_keys in keys),
            len(answers),
            len(to_ask),
            self.url,
        )
        outstanding = Counter(index for indices in waiting.values() for index in indices)
        settled = len(comparisons) - len(outstanding)  # cached or tied: no request to wait for

        def answered(key: str) -> None:
            nonlocal settled
            for index in waiting[key]:
                outstanding[index] -= 1
                settled += outstanding[index] == 0
            if done is not None:
                done(settled)

        answers.update(self._ask_all(to_ask, answered))
        return [
            self._verdict(positions, [answers[key] for key in question_keys])
            for positions, question_keys in zip(orders, keys, strict=True)
        ]

    def _verdict(self, positions: list[Position], answers: list[str]) -> Verdict:
        """The verdict from the answers with the candidate at each of ``positions`` (no answers: identical responses tie)."""
        if not answers:
            return Verdict(0.5, {"candidate_position": positions[0], "choice": None, "answer": None})
        choices = [parse_choice(answer, self.config.choice_label) for answer in answers]
        outcomes = [
            math.nan if choice is None else float(choice == position) for choice, position in zip(choices, positions, strict=True)
        ]
        detail = {"candidate_position": positions[0], "choice": choices[0], "answer": answers[0]}
        if len(positions) == 1:
            return Verdict(outcomes[0], detail)
        detail |= {"swap_choice": choices[1], "swap_answer": answers[1]}
        orders = (outcomes[0], outcomes[1]) if positions[0] == "A" else (outcomes[1], outcomes[0])
        outcome = outcomes[0]
        if self.config.inconsistent_as_tie:
            first, second = outcomes
            outcome = math.nan if math.isnan(first) or math.isnan(second) else first if first == second else 0.5
        return Verdict(outcome, detail, orders=orders)

    def _ask_all(self, questions: dict[str, tuple[str, str, str]], answered: Callable[[str], None]) -> dict[str, str]:
        """Each question's answer, ``max_concurrency`` requests at a time, ``answered`` told each key as its answer
        arrives; on a failure, requests already sent are awaited (their answers cached) and no more are sent before
        the error is raised."""
        if not questions:
            return {}
        self._headers()  # a missing API key fails here, before any thread starts
        stop = threading.Event()
        answers: dict[str, str] = {}
        executor = ThreadPoolExecutor(min(self.config.max_concurrency, len(questions)), thread_name_prefix="llm-judge")
        futures = {executor.submit(self._ask, key, *question, stop): key for key, question in questions.items()}
        try:
            for future in as_completed(futures):
                answer = future.result()
                if answer is not None:
                    answers[futures[future]] = answer
                    answered(futures[future])
        except JudgeError as error:
            executor.shutdown(wait=True, cancel_futures=True)
            saved = sum(
                not future.cancelled() and future.exception() is None and future.result() is not None for future in futures
            )
            raise JudgeError(
                f"{error}\n{saved} of {len(questions)} new answers are cached in {self.cache_dir}; a rerun resumes from them"
            ) from None
        except BaseException:  # e.g. Ctrl-C: let the requests in flight finish and be cached, send no more
            stop.set()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        return answers

    def _ask(self, key: str, prompt: str, response_a: str, response_b: str, stop: threading.Event) -> str | None:
        """The model's answer, cached before it is returned, retried with exponential backoff on transient
        failures; None when ``stop`` was set (another request failed) before an answer came."""
        content = self.config.template.format(prompt=prompt, response_a=response_a, response_b=response_b)
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            }
        ).encode()
        retries = 0
        try:
            while not stop.is_set():
                try:
                    answer = self._send(body)
                except _Transient as error:
                    if retries == self.config.max_retries:
                        raise JudgeError(f"{error}; gave up after {retries + 1} attempts") from None
                    delay = self.config.backoff * 2**retries if error.retry_after is None else error.retry_after
                    delay = min(delay, self.config.max_retry_after)
                    retries += 1
                    log.warning("%s; retry %d of %d in %.3g s", error, retries, self.config.max_retries, delay)
                    stop.wait(delay)
                else:
                    self._store(key, answer)
                    return answer
        except BaseException:
            stop.set()  # the other workers send no more requests; the caller reports this error
            raise
        return None

    def check_endpoint(self) -> None:
        """Fail now, before anything trains, unless ``{base_url}/models`` answers and lists the model (a server without
        that route is taken at its word: the first judgment will tell). Sent like a judgment: no redirect followed."""
        url = f"{self.config.base_url}/models"
        try:
            status, reason, _, raw = self._request("GET", url, None, min(self.config.timeout, 10.0))
        except _Transient as error:
            raise JudgeError(
                f"the LLM judge at {self.config.base_url} is not reachable ({error}). Start an OpenAI-compatible server "
                "there (e.g. `vllm serve <model> --port 8000`; in a checkout, `python tests/chat_server.py` is a stand-in "
                "that prefers the longer response), set task.evaluation.judge.base_url to one, or train without "
                "judging: --set task.evaluation=null"
            ) from None
        if status in (404, 405):
            return
        if status != 200:
            excerpt = self._redact(" ".join(raw[:300].decode(errors="replace").split()))
            moved = " (redirects are not followed: the request carries the API key)" if 300 <= status < 400 else ""
            raise JudgeError(f"the LLM judge at {url} answered HTTP {status} {reason}{moved}: {excerpt}")
        try:
            listing = decode_json(raw)
        except ValueError:
            raise JudgeError(f"{url} did not answer with JSON: is {self.config.base_url} an OpenAI-compatible API?") from None
        models = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(models, list | None):
            excerpt = self._redact(" ".join(raw[:100].decode(errors="replace").split()))
            raise JudgeError(f"{url} answered without a list of models in data: {excerpt}; is it an OpenAI-compatible API?")
        served = [str(model.get("id")) for model in models or [] if isinstance(model, dict)]
        if served and self.config.model not in served:
            raise JudgeError(
                f"the LLM judge at {self.config.base_url} serves {', '.join(served[:10])}, not {self.config.model!r}: "
                "set task.evaluation.judge.model to one of them"
            )

    def _send(self, body: bytes) -> str:
        status, reason, headers, raw = self._request("POST", self.url, body, self.config.timeout)
        if status != 200:
            message = (
                f"HTTP {status} {reason} from {self.url}: {self._redact(' '.join(raw[:300].decode(errors='replace').split()))}"
            )
            if 300 <= status < 400:
                location = headers.get("Location")
                where = f" (it pointed to {self._redact(location)})" if location else ""
                raise JudgeError(
                    f"{message}; redirects are not followed (the request carries the API key): set base_url to where "
                    f"the endpoint answers{where}"
                )
            if status == 429 or status >= 500:
                raise _Transient(message, _retry_after(headers.get("Retry-After")))
            raise JudgeError(message)
        try:
            content = decode_json(raw)["choices"][0]["message"]["content"]  # type: ignore[index]
        except (ValueError, LookupError, TypeError):
            raise JudgeError(
                f"{self.url} answered without choices[0].message.content: {self._redact(raw[:300].decode(errors='replace'))}"
            ) from None
        # a null content (a refusal) is an unparseable answer; a key the server echoes is written nowhere
        return self._redact(content) if isinstance(content, str) else ""

    def _request(
        self, method: str, url: str, body: bytes | None, timeout: float
    ) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        """One request within ``timeout`` seconds in all: (status, reason, headers, body up to the cap)."""
        parts = urllib.parse.urlsplit(url)
        connection = (
            http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=ssl.create_default_context())
            if parts.scheme == "https"
            else http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        )
        expired = threading.Event()
        opened: list[socket.socket] = []  # the response keeps reading from it after the connection lets go of it

        def expire() -> None:  # per-operation socket timeouts let a server that trickles bytes hold a request forever
            expired.set()
            for sock in opened:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.connect()
            opened.append(connection.sock)
            if expired.is_set():  # the deadline passed while connecting, before there was a socket to shut
                raise TimeoutError
            connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body, self._headers())
            response = connection.getresponse()
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as error:
            if expired.is_set():
                raise _Transient(f"no answer from {url} (TimeoutError: over {timeout:g} s in all)") from None
            raise _Transient(f"no answer from {url} ({type(error).__name__}: {error})") from None
        finally:
            watchdog.cancel()
            connection.close()
        if expired.is_set():
            raise _Transient(f"no answer from {url} (TimeoutError: over {timeout:g} s in all)")
        if len(raw) > MAX_RESPONSE_BYTES:
            raise JudgeError(f"{url} answered with more than {MAX_RESPONSE_BYTES} bytes; a chat completion is far smaller")
        return response.status, response.reason, response.headers, raw

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env is not None:
            key = os.environ.get(self.config.api_key_env, "")
            if not key:
                raise JudgeError(
                    f"the LLM judge reads its API key from the environment variable {self.config.api_key_env}, which is "
                    "unset or empty (set api_key_env to null for a server without authentication)"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _redact(self, text: str) -> str:
        """``text`` without the API key: servers may echo it in their error messages."""
        key = os.environ.get(self.config.api_key_env, "") if self.config.api_key_env is not None else ""
        return text.replace(key, "[API key]") if key else text

    def _key(self, prompt: str, response_a: str, response_b: str) -> str:
        """sha256 of everything the answer depends on: the judge (endpoint, model, template, sampling) and the texts."""
        identity = self.config.model_dump(include={"base_url", "model", "template", "temperature", "max_tokens"})
        identity.update(prompt=prompt, response_a=response_a, response_b=response_b)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _load(self, key: str) -> str | None:
        try:
            answer = json.loads((self.cache_dir / f"{key}.json").read_text(encoding="utf-8"))["answer"]
        except FileNotFoundError:
            return None
        return self._redact(str(answer))  # a cache written before echoed keys were redacted

    def _store(self, key: str, answer: str) -> None:
        """Written atomically: concurrent writers and crashes leave whole files."""
        atomic_write(self.cache_dir / f"{key}.json", json.dumps({"answer": answer}))

"""Two ways to ask an LLM: a local transformers model, or an OpenAI-compatible HTTP server.

Both take a list of chat conversations and return one ``Generation`` per conversation, in order;
both decode greedily, so a rerun asks the same thing and (up to the server's own determinism)
gets the same answer.

- ``TransformersChatLM``: a causal LM with its tokenizer's chat template, prompts batched with
  LEFT padding (a decoder-only model continues from the last position, so padding must not sit
  between the prompt and the answer), sorted by length so a batch wastes little padding.
- ``OpenAIChatEndpoint``: ``POST <url>/v1/chat/completions`` (vLLM, llama.cpp server, TGI, ...)
  with the standard library only, a bounded thread pool, a timeout per request and retries with
  exponential backoff (at least the Retry-After a server sends) on timeouts, connection errors,
  HTTP 5xx and 429. Every ``Generation`` says how many attempts it took; each retry is logged
  on the ``soundstage.llm`` logger. A bearer token, if the server wants one, is read from the
  environment variable ``SOUNDSTAGE_LLM_API_KEY`` (never stored or logged).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

from soundstage.device import torch_dtype
from soundstage.pipeline.identity import model_source
from soundstage.pipeline.stage import Param

log = logging.getLogger("soundstage.llm")

#: environment variable holding a bearer token for the HTTP endpoint (never stored or logged)
API_KEY_ENV = "SOUNDSTAGE_LLM_API_KEY"


@dataclass(frozen=True)
class Generation:
    text: str | None  # None when no answer was obtained
    attempts: int = 1
    error: str = ""  # why there is no answer


class TransformersChatLM:
    """A local causal LM (hub id or directory), greedy, batched with left padding."""

    def __init__(self, source: str, device: str = "cpu", dtype: str = "fp32", max_new_tokens: int = 256, batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy; the HTTP backend needs none of it

        source = model_source(source, "--llm")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {source} has no chat template; use a chat/instruct model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype)).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def prompt_texts(self, conversations: list) -> list[str]:
        return [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]

    def generate(self, conversations: list) -> list[Generation]:
        import torch  # the HTTP backend needs no torch

        texts = self.prompt_texts(conversations)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        answers: list = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # the chat template already holds BOS and the like: add no special tokens again
            enc = self.tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
            with torch.inference_mode():
                out = self.model.generate(
                    **enc,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(chunk, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = Generation(text.strip())
        return answers


class _Retryable(Exception):
    """A failure worth another attempt (timeout, connection, 5xx, 429)."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after  # what the server asked for (Retry-After), in seconds


@dataclass(frozen=True)
class HttpSettings:
    """How an endpoint is asked. None of it changes an answer, so none of it is in the cache key."""

    timeout: float = 120.0  # seconds before a request counts as timed out
    max_attempts: int = 4  # per answer: timeouts, connection errors, HTTP 5xx and 429 are retried
    concurrency: int = 8  # requests in flight at once
    backoff: float = 1.0  # seconds before the first retry; doubles per retry (with jitter)
    backoff_max: float = 60.0  # longest wait between attempts

    @classmethod
    def from_params(cls, params: dict) -> HttpSettings:
        """The settings among a stage's parameters (``http_params``)."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


def http_params() -> list[Param]:
    """``--timeout``, ``--max-attempts``, ``--concurrency``, ``--backoff``: the transport options of a
    stage that asks an endpoint (defaults from ``HttpSettings``)."""
    d = HttpSettings()
    return [
        Param("timeout", float, d.timeout, "seconds before an HTTP request counts as timed out", fingerprint=False),
        Param(
            "max_attempts",
            int,
            d.max_attempts,
            "HTTP attempts per answer (timeouts, connection errors, 5xx, 429)",
            fingerprint=False,
        ),
        Param("concurrency", int, d.concurrency, "HTTP requests in flight at once", fingerprint=False),
        Param("backoff", float, d.backoff, "seconds before the first retry; doubles per retry", fingerprint=False),
    ]


class OpenAIChatEndpoint:
    """An OpenAI-compatible chat-completions server, asked with bounded concurrency and retries.
    ``http`` (or its fields as keywords) says how (``HttpSettings``)."""

    def __init__(self, url: str, model: str, max_new_tokens: int = 256, http: HttpSettings | None = None, **settings):
        self.url = chat_completions_url(url)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.http = replace(http or HttpSettings(), **settings)
        self.sleep = time.sleep  # replaceable, so tests can see the delays without waiting

    def generate(self, conversations: list) -> list[Generation]:
        workers = min(max(1, self.http.concurrency), max(1, len(conversations)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._ask, conversations))

    def _ask(self, messages: list) -> Generation:
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens, "temperature": 0}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        max_attempts = max(1, self.http.max_attempts)
        for attempt in range(1, max_attempts + 1):
            try:
                return Generation(self._post(body, headers), attempt)
            except _Retryable as e:
                if attempt == max_attempts:
                    return Generation(None, attempt, f"{e} (gave up after {attempt} attempts)")
                # exponential backoff with jitter (many threads must not retry in lockstep),
                # at least what the server asked for
                delay = self.http.backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)
                delay = min(self.http.backoff_max, max(delay, e.retry_after))
                log.warning("LLM request failed (%s); attempt %d/%d in %.2f s", e, attempt + 1, max_attempts, delay)
                self.sleep(delay)
            except ValueError as e:  # a definite answer that is not usable: retrying would repeat it
                return Generation(None, attempt, str(e))
        raise AssertionError("unreachable")

    def _post(self, body: bytes, headers: dict) -> str:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.http.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            if e.code >= 500 or e.code in (408, 429):
                raise _Retryable(f"HTTP {e.code}: {detail}", _seconds(e.headers.get("Retry-After"))) from None
            raise ValueError(f"HTTP {e.code}: {detail}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.http.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.http.timeout:g} s") from None
            raise _Retryable(f"connection failed: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"connection failed: {e!r}") from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"response is not a chat completion: {payload[:200]!r}") from None
        return content if isinstance(content, str) else ""


def _seconds(retry_after: str | None, now: float | None = None) -> float:
    """A Retry-After header in seconds: delay-seconds, or an HTTP-date (RFC 9110 allows both)."""
    if not retry_after:
        return 0.0
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return 0.0  # unreadable: the client's own backoff applies
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def chat_completions_url(url: str) -> str:
    """``http://host:8000``, ``.../v1`` or the full path, all to ``.../v1/chat/completions``."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")

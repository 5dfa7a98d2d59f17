"""The OpenAI-compatible chat endpoint that explains, classifies and scores features (OpenAI, vLLM,
llama.cpp's server), through the `openai` client. Torch-free: the server probes the endpoint when a
job is submitted, the worker makes the calls.

Every failure becomes an LLMError whose message names the setting to change: an unreachable
endpoint (RA_LLM_BASE_URL), a model the endpoint does not serve (RA_LLM_MODEL), a refused key
(RA_LLM_API_KEY), a reply that is not a JSON object or lacks a field (RA_LLM_MODEL, RA_LLM_JSON_MODE),
a reply cut off by the token limit (RA_LLM_MAX_TOKENS).

A reply that arrives but cannot be used (no JSON object, a missing field, a value out of range) is a
ReplyError: it is asked again, sampled, up to REPLY_TRIES times, because small models slip now and
then where they do not fail always; the job then decides whether one feature's slip ends it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.core.settings import Settings

# How a request asks for JSON (RA_LLM_JSON_MODE): OpenAI and vLLM take "json_object" (any object)
# or "json_schema" (structured outputs); llama.cpp's server takes its own "schema" key inside
# json_object and refuses json_schema; "none" asks in the prompt only.
JSON_MODES = ("json_object", "schema", "json_schema", "none")
PROBE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
REPLY_TRIES = 3  # the first greedy, the others sampled (temperature RETRY_TEMPERATURE, seeded)
RETRY_TEMPERATURE = 0.7
# `\'` is not a JSON escape, but models trained on Python write it (SmolLM2 does, even under a grammar)
_PYTHON_QUOTE = re.compile(r"(?<!\\)((?:\\\\)*)\\'")


class LLMError(Exception):
    """A failure of the endpoint or of its reply; the message names the setting to look at."""


class ReplyError(LLMError):
    """The endpoint answered, but its reply cannot be used: asked again before it is given up."""

    tokens = 0  # what the tries that were given up spent


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str = ""
    json_mode: str = "json_object"
    max_tokens: int = 300
    timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Endpoint | None":
        """The configured endpoint, or None when RA_LLM_BASE_URL is empty (the offline explainer)."""
        if not settings.llm_base_url.strip():
            return None
        return cls(settings.llm_base_url.strip(), settings.llm_model.strip(), settings.llm_api_key,
                   settings.llm_json_mode, settings.llm_max_tokens, settings.llm_timeout_s)

    @classmethod
    def from_params(cls, params: dict, settings: Settings) -> "Endpoint | None":
        """The endpoint a job recorded (its key is never stored: the worker's own setting)."""
        llm = params.get("llm")
        if not llm:
            return None
        return cls(llm["base_url"], llm["model"], settings.llm_api_key, llm.get("json_mode", "json_object"),
                   int(llm.get("max_tokens", 300)), settings.llm_timeout_s)

    def describe(self) -> dict[str, Any]:
        """What a job records of it (no key)."""
        return {"base_url": self.base_url, "model": self.model, "json_mode": self.json_mode,
                "max_tokens": self.max_tokens}


@dataclass
class Reply:
    data: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _client(endpoint: Endpoint):
    from openai import OpenAI  # lazy: openai (0.4 s) loads only when an endpoint is called, not with the web app

    # no retries: a dead endpoint fails the job now, with its message, rather than after minutes
    return OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "none", max_retries=0,
                  timeout=endpoint.timeout_s)


def _response_format(endpoint: Endpoint, schema: dict, name: str) -> dict | None:
    if endpoint.json_mode == "json_object":
        return {"type": "json_object"}
    if endpoint.json_mode == "schema":
        return {"type": "json_object", "schema": schema}
    if endpoint.json_mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    return None


def _explain_api_error(endpoint: Endpoint, exc: Exception) -> LLMError:
    import openai  # lazy: loaded by _client already; the module stays free of it until an endpoint is called

    where = f"the LLM endpoint at {endpoint.base_url} (RA_LLM_BASE_URL)"
    if isinstance(exc, openai.APITimeoutError):
        return LLMError(f"{where} did not answer within {endpoint.timeout_s:g} s (RA_LLM_TIMEOUT_S)")
    if isinstance(exc, openai.APIConnectionError):
        return LLMError(f"could not reach {where}: {exc}")
    if isinstance(exc, openai.AuthenticationError):
        return LLMError(f"{where} refused the API key (RA_LLM_API_KEY): {exc}")
    if isinstance(exc, openai.NotFoundError):
        return LLMError(f"{where} has no model {endpoint.model!r} (RA_LLM_MODEL), or no chat-completions route "
                        f"under that URL: {exc}")
    if isinstance(exc, openai.APIStatusError):
        return LLMError(f"{where} refused the request with HTTP {exc.status_code} (check RA_LLM_MODEL "
                        f"{endpoint.model!r} and RA_LLM_JSON_MODE {endpoint.json_mode!r}): {str(exc)[:300]}")
    return LLMError(f"{where} failed: {type(exc).__name__}: {exc}")


def parse_object(text: str | None, endpoint: Endpoint) -> dict[str, Any]:
    """The reply's JSON object: the whole reply, or the first {...} inside it (a model asked in the
    prompt only may wrap it in prose)."""
    text = (text or "").strip()
    candidates = [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    candidates += [_PYTHON_QUOTE.sub(r"\1'", c) for c in candidates if "\\'" in c]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    shown = text[:120] + ("…" if len(text) > 120 else "")
    raise ReplyError(f"the model {endpoint.model!r} (RA_LLM_MODEL) returned no JSON object ({endpoint.json_mode} "
                     f"mode, RA_LLM_JSON_MODE): {shown!r}")


def malformed(endpoint: Endpoint, what: str) -> ReplyError:
    return ReplyError(f"the model {endpoint.model!r} (RA_LLM_MODEL) returned malformed JSON: {what}")


def _complete(endpoint: Endpoint, messages: list[dict], fmt: dict | None, attempt: int):
    sampling = {"temperature": 0.0} if attempt == 0 else {"temperature": RETRY_TEMPERATURE, "seed": attempt}
    try:
        response = _client(endpoint).chat.completions.create(
            model=endpoint.model, messages=messages, max_tokens=endpoint.max_tokens, **sampling,
            **({"response_format": fmt} if fmt else {}))
    except Exception as exc:
        raise _explain_api_error(endpoint, exc) from None
    if not response.choices:
        raise LLMError(f"the endpoint at {endpoint.base_url} (RA_LLM_BASE_URL) returned no choices")
    if response.choices[0].finish_reason == "length":  # not asked again: a longer reply needs the setting raised
        raise LLMError(f"the model's reply was cut off at the token limit, {endpoint.max_tokens} tokens "
                       f"(RA_LLM_MAX_TOKENS): raise it")
    return response


def chat_json(endpoint: Endpoint, system: str, user: str, schema: dict, name: str,
              check: Callable[[dict], Any] | None = None, tries: int = REPLY_TRIES) -> Reply:
    """A chat completion whose reply must be a JSON object with the schema's required fields and pass
    `check` (which raises ReplyError): asked up to `tries` times; the tokens of every try count."""
    fmt = _response_format(endpoint, schema, name)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt_tokens = completion_tokens = 0
    for attempt in range(tries):
        response = _complete(endpoint, messages, fmt, attempt)
        usage = response.usage
        prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        try:
            data = parse_object(response.choices[0].message.content, endpoint)
            missing = [key for key in schema.get("required", []) if key not in data]
            if missing:
                raise malformed(endpoint, f"no {missing[0]!r} field in {json.dumps(data)[:120]}")
            if check is not None:
                check(data)
            return Reply(data, prompt_tokens, completion_tokens)
        except ReplyError as exc:
            last = exc
    failed = ReplyError(f"{last} ({tries} tries)" if tries > 1 else str(last))
    failed.tokens = prompt_tokens + completion_tokens
    raise failed from None


def served_models(endpoint: Endpoint) -> list[str]:
    try:
        return [m.id for m in _client(endpoint).models.list()]
    except Exception as exc:
        raise _explain_api_error(endpoint, exc) from None


def probe(endpoint: Endpoint) -> None:
    """Before a job is queued: the endpoint answers, serves the model, and returns a JSON object
    within the token limit. LLMError otherwise. (llama.cpp's server answers any model name with
    its own model, so the name is checked against the models it lists.)"""
    models = served_models(endpoint)
    if models and endpoint.model not in models:
        listed = ", ".join(repr(m) for m in models[:10])
        raise LLMError(f"the LLM endpoint at {endpoint.base_url} (RA_LLM_BASE_URL) serves no model "
                       f"{endpoint.model!r} (RA_LLM_MODEL); it lists {listed}")
    chat_json(endpoint, "You reply with a JSON object only.", 'Reply with the JSON object {"ok": true}.',
              PROBE_SCHEMA, "probe", tries=1)

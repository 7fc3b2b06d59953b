"""The OpenAI API as this server speaks it: request bodies (validated), error JSON, response shapes.

Fields the engine cannot honour are refused by name (400), never silently ignored: a penalty, a logit
bias, n > 1, best_of, echo, suffix, tools. Unknown fields are refused too (a misspelt `max_token`
would otherwise run with the default). Extras in vLLM's spelling: top_k, stop_token_ids, ignore_eos.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlapipe.runtime.sampling_params import MAX_LOGPROBS, MIN_TEMPERATURE, SamplingParams, SamplingParamsError

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An OpenAI error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError -> 400 naming the first bad field (OpenAI answers 400, not 422)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {'.'.join(loc)!r}", param=".".join(loc) or None)
    # union members add their type name to the location (prompt.str, prompt.list[int]): keep the field
    param = ".".join(p for p in loc if not p.startswith(("str", "list[", "int", "function-"))) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param or 'request'}: {message}", param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extra; 0 or -1: all tokens
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)  # a list, once validated
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, not used

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (use 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; a value it refuses is a 400 naming the field."""
        # below MIN_TEMPERATURE the distribution is one-hot anyway: raised to it, as vLLM does
        temperature = max(self.temperature, MIN_TEMPERATURE) if self.temperature > 0 else 0.0
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=max(self.top_k, 0),
                top_p=self.top_p,
                seed=self.seed,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
            )
        except SamplingParamsError as e:
            name = str(e).split(" ", 1)[0]  # its messages start with the parameter's name
            raise APIError(400, str(e), param=name if name in type(self).model_fields else None) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (n = 1); send the others as separate requests")
            prompt = prompt[0]
        return prompt

    @model_validator(mode="after")
    def _unsupported(self):
        for name, ok in (
            ("echo", not self.echo),
            ("best_of", self.best_of in (None, 1)),
            ("suffix", self.suffix is None),
        ):
            if not ok:
                raise ValueError(f"{name} is not supported")
        return self


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def template_messages(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates know only the older one
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# responses ----------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_label(raw: bytes) -> str:
    """A token as OpenAI names it: its text, or "bytes:\\xe2\\x80" for a piece of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokens: list, token_bytes) -> dict[str, list]:
    """The completions API's logprobs object for some tokens (serve_loop.TokenInfo); text_offset is
    where each token's text starts in the completion; token_bytes(token id) is what a token stands for."""
    label = lambda token_id: token_label(token_bytes(token_id))
    return {
        "tokens": [label(t.token_id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{label(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def chat_logprobs(tokens: list, token_bytes) -> dict[str, list]:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(token_id)
        return {"token": token_label(raw), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
            for t in tokens
        ]
    }

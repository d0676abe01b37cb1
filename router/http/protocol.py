"""OpenAI-compatible request bodies, validated with pydantic (strict types: a string is not a
number), and the error body every failure answers with."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            405: "invalid_request_error",
            413: "invalid_request_error",
            415: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(status, "server_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    # Before `content`, whose check reads them. Tool calls are accepted, not acted on.
    tool_calls: list[dict] | None = None
    function_call: dict | None = None
    content: Annotated[str | list[TextPart] | None, Field(validate_default=True)] = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v, info):
        # As OpenAI: only an assistant message that calls tools may go without content.
        data = info.data
        calls = data.get("tool_calls") or data.get("function_call")
        if v is None and not (data.get("role") == "assistant" and calls):
            unless = " unless they carry tool_calls" if data.get("role") == "assistant" else ""
            raise ValueError(
                f"{data.get('role', 'chat')} messages need content (a string or a list of text "
                f"parts){unless}"
            )
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: int = -1
    min_p: Probability = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=1.0, le=2.0)] = 1.0
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    user: str | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError("top_k must be -1 (disabled), 0 (disabled) or positive")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
            if any(not s for s in v):
                raise ValueError("stop strings must not be empty")
        elif v == "":
            raise ValueError("stop strings must not be empty")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


PromptIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: (
        str
        | PromptIds
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[PromptIds], Field(min_length=1)]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = 16

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    @model_validator(mode="after")
    def _check(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only meaningful with echo")
        if self.prompt == "":
            raise ValueError("prompt must not be empty")
        return self


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    path = ""
    for x in first.get("loc", ()):
        if isinstance(x, int):
            path += f"[{x}]"  # OpenAI's spelling: messages[1].content
        elif not (x.split("[")[0] in _TYPE_TAGS or x.startswith("function-")):
            path += f".{x}" if path else x
    param = path or None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if path.startswith("prompt") and first.get("type") != "value_error":
        param = "prompt"
        msg = (
            "must be a non-empty string, list of strings, list of token ids or list of "
            "token-id lists"
        )
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")

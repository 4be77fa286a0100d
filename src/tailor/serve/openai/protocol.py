"""Request and response shapes of the OpenAI chat completions API, the subset `tailor serve` implements.

Requests reject unknown fields, as OpenAI does: a parameter we do not implement fails loudly instead of being
silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from pydantic_core import PydanticCustomError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="Who wrote the message.")
    content: str = Field(description="The message text.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk, with no choices, carrying the token usage.")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base model's name or an adapter's, as GET /v1/models lists them.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far, oldest first.")
    stream: bool = Field(False, description="Send the reply as server-sent events, token by token.")
    stream_options: StreamOptions | None = Field(None, description="Options for a streamed reply.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy; higher samples more freely.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample only from the most likely tokens holding this mass.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; the server's default if unset.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens; wins if both set.")
    stop: list[str] | None = Field(None, max_length=4,
                                   description="Up to 4 strings that end the reply (not included); one may be bare.")
    seed: int | None = Field(None, description="Makes sampling repeatable.")
    n: int = Field(1, description="Number of replies; only 1 is supported.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise PydanticCustomError("unsupported", "only n=1 is supported")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _bare_stop_string(cls, stop: object) -> object:
        # OpenAI takes a string or a list; always a list here, so an error names `stop[1]`, not a union member
        return [stop] if isinstance(stop, str) else stop

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None

    @field_serializer("delta")
    def _only_what_changed(self, delta: Delta) -> dict:
        return delta.model_dump(exclude_none=True)  # as OpenAI: role in the first chunk only, {} in the last


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tailor"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

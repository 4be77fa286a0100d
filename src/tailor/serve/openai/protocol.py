"""Request and response shapes of the OpenAI API, the subset `tailor serve` implements (chat completions, legacy
completions, models), plus tailor's own feedback and admin shapes, and `ApiError`, the one way a request fails.

Requests reject unknown fields, as OpenAI does: a parameter we do not implement fails loudly instead of being
silently ignored.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from typing import Annotated, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_serializer, field_validator, model_serializer
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="Who wrote the message.")
    content: str = Field(description="The message text.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk, with no choices, carrying the token usage.")


class SamplingRequest(BaseModel, ABC):
    """What chat and legacy completions share: the model, sampling options, streaming and the caller."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A model, adapter or A/B alias, as GET /v1/models lists them.")
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
    user: str | None = Field(None, max_length=256,
                             description="Who asks; keeps an A/B alias on the same model for the same user.")

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

    def sampling(self) -> dict:
        return {"max_tokens": self.token_budget(), "temperature": self.temperature, "top_p": self.top_p,
                "stop": self.stop, "seed": self.seed}

    @abstractmethod
    def logprob_count(self) -> int | None:
        """Alternatives per position (0: the chosen token only); None: no logprobs asked for. Each request kind
        asks for logprobs its own way."""

    def deterministic(self) -> bool:
        """The same request gives the same answer, so a cached one may be served."""
        return self.temperature == 0 or self.seed is not None


MAX_TOP_LOGPROBS = 20  # as OpenAI
# streamed text deltas are cut at character and stop-string boundaries, not at tokens
STREAMED_LOGPROBS = "logprobs are returned with whole replies only (stream: false)"


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far, oldest first.")
    logprobs: bool = Field(False, description="Return the log-probability of each reply token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "With logprobs: also the most likely alternatives at each position, this many."))

    def logprob_count(self) -> int | None:
        """Alternatives per position (0: the chosen token only); None: no logprobs asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def option_problem(self) -> tuple[str, str] | None:
        """(field, message) of options that do not go together."""
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.logprobs and self.stream:
            return "logprobs", STREAMED_LOGPROBS
        return None


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# what the schema promises: no empty prompt anywhere (`option_problem` refuses one with a single 400 naming `prompt`,
# where pydantic's own constraints on a union would list one error per member)
_PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                            _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]}


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT_SCHEMA)] = Field(
        description="The text to continue (no chat template is applied): a string, token ids, or a list of either "
                    "for one choice per prompt.")
    logprobs: int | None = Field(None, ge=0, le=5, description=(
        "Return each token's log-probability and this many most likely alternatives per position."))
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs if asked).")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(cast("list[str] | list[list[int]]", prompt))

    def logprob_count(self) -> int | None:
        return self.logprobs

    def option_problem(self) -> tuple[str, str] | None:
        prompts = self.prompts()
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            return "prompt", "must not be empty"
        if self.stream and self.logprobs is not None:
            return "logprobs", STREAMED_LOGPROBS
        if self.stream and len(prompts) > 1:
            return "prompt", "a streamed completion takes one prompt"
        return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Citation(BaseModel):
    """A source of a grounded answer: where the passage comes from and what it says (a tailor extension that the
    `openai` client keeps as an extra field)."""

    id: str = Field(description="The corpus chunk id.")
    source: str = Field(description="The document: a file path or a crawled URL.")
    title: str | None = Field(None, description="The document's title.")
    page: int | None = Field(None, description="PDF page, when the document has pages.")
    line: int | None = Field(None, description="Line of the document where the record starts, when known.")
    url: str | None = Field(None, description="The document's URL, when it was crawled.")
    snippet: str = Field(description="The start of the quoted passage.")
    rank: int = Field(description="The passage's place in the retrieval ranking (1 = best).")
    support: float | None = Field(None, description="Share of the answer's content words the passage holds.")


class _Extensions(BaseModel):
    """Leaves out tailor's extension fields while they are None, so a reply of a model without retrieval is exactly
    OpenAI's shape."""

    @model_serializer(mode="wrap")
    def _drop_unset_extensions(self, handler):
        data = handler(self)
        if data.get("citations") is None:
            data.pop("citations", None)
        return data


class ChatCompletion(_Extensions):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage
    citations: list[Citation] | None = Field(None, description=(
        "Sources of a grounded answer (models served with retrieval); [] when it abstained."))


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


class ChatCompletionChunk(_Extensions):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    citations: list[Citation] | None = Field(None, description="On the chunk that ends a grounded reply.")


class CompletionLogprobs(BaseModel):
    """The legacy shape: per token its text, log-probability (None for the first prompt token, which nothing
    predicts), most likely alternatives and character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A legacy completion, or one chunk of a streamed one (`object` is "text_completion" for both, as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tailor"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    default: str | None = Field(None, description=(
        "tailor extension: the model the workspace customized, which the chat page opens on."))


class SourcePassage(BaseModel):
    """GET /v1/sources/{id}: the whole chunk a citation points to, with its provenance."""

    id: str
    source: str
    title: str | None = None
    page: int | None = None
    line: int | None = None
    url: str | None = None
    text: str


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(HTTPException):
    """A request that fails: the status, OpenAI's error body, and headers such as Retry-After. An HTTPException, so
    one raised while the framework reads the body (too large) keeps its status instead of becoming a generic 400."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = headers or {}


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(max_length=128, description="The `id` of the completion the feedback is about.")
    rating: Literal["up", "down"] = Field(description="Thumbs up or down.")
    correction: str | None = Field(None, max_length=20_000, description="What the answer should have been.")
    comment: str | None = Field(None, max_length=5_000, description="Anything else the user wants to say.")
    user: str | None = Field(None, max_length=256, description="Who gives the feedback.")


class FeedbackReceipt(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    response_id: str
    model: str
    rating: Literal["up", "down"]


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$",
                      description="The model name clients will use.")
    path: str = Field(min_length=1, description="A PEFT adapter folder on the server's disk.")

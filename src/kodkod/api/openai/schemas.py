"""Request schemas of the OpenAI endpoints.

Sampler fields come from `api.sampling.SamplerRequest`; these classes add the OpenAI-specific
ones. Unknown fields are ignored (clients send many we don't use).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from kodkod.api.sampling import SamplerRequest
from kodkod.api.validation import REQUEST_CONFIG, Name


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = REQUEST_CONFIG
    type: str = "text"
    json_schema: Any = None


class CommonCompletionRequest(SamplerRequest):
    model: Name | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int = Field(1, ge=1, le=64)
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    user: str | None = None


class CompletionRequest(CommonCompletionRequest):
    prompt: str | list[int] | list[str | list[int]]  # text, token ids, or a list of either

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str = "user"
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    name: str | None = None


class ReasoningOptions(BaseModel):
    model_config = REQUEST_CONFIG
    effort: str | None = None
    enabled: bool | None = None
    max_tokens: int | None = None


class ChatCompletionRequest(CommonCompletionRequest):
    messages: list[ChatMessage]
    prompt_template: Name | None = None
    add_generation_prompt: bool = True
    template_vars: dict[str, Any] = Field(
        default_factory=dict, validation_alias=AliasChoices("template_vars", "chat_template_kwargs")
    )
    response_prefix: str | None = None
    tools: list[ToolSpec] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    continue_final_message: bool = False
    reasoning_effort: str | None = None
    enable_thinking: bool | None = None
    verbosity: str | None = None
    reasoning: ReasoningOptions | None = None
    reasoning_budget_tokens: int | None = Field(
        None,
        validation_alias=AliasChoices(
            "reasoning_budget_tokens", "reasoning_budget", "thinking_budget", "thinking_token_budget"
        ),
    )
    reasoning_budget_message: str | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _chat_logprobs(cls, v: Any) -> Any:
        if v is True:
            return 1
        if v is False or v is None:
            return 0
        return v

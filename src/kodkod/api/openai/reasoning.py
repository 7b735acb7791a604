"""The reasoning budget of a chat request: how many tokens the reply may spend
inside its reasoning block before the server closes it.

Budget: request `reasoning_budget_tokens` (aliases `reasoning_budget`, `thinking_budget`,
`thinking_token_budget`) → request `reasoning.max_tokens` → the model's config
`reasoning_budget_tokens`; negative or unset means unlimited. When the budget is used up the
server forces `reasoning_budget_message` (request → config → empty) followed by the reasoning
end tag into the output (`engine.reasoning_budget`). No budget applies without a reasoning
format (`reasoning: true` in the model's config) or when the output is constrained (the
constraint already decides every token).
"""

from __future__ import annotations

from collections.abc import Callable

from kodkod.api.openai.schemas import ChatCompletionRequest
from kodkod.chat.channels import SplitterConfig
from kodkod.engine.reasoning_budget import ReasoningBudget
from kodkod.models.manager import LoadedModel


def _budget(req: ChatCompletionRequest, extra: dict) -> int | None:
    for value in (
        req.reasoning_budget_tokens,
        req.reasoning.max_tokens if req.reasoning is not None else None,
        extra.get("reasoning_budget_tokens"),
    ):
        if value is not None:
            return int(value) if int(value) >= 0 else None
    return None


def budget_factory(
    req: ChatCompletionRequest, model: LoadedModel, split: SplitterConfig, constrained: bool
) -> Callable[[], ReasoningBudget] | None:
    """A maker of one budget constraint per choice, or None when no budget applies."""
    extra = model.params.extra
    budget = _budget(req, extra)
    if budget is None or split.reasoning is None or constrained:
        return None
    start, end = split.reasoning
    message = req.reasoning_budget_message
    if message is None:
        message = str(extra.get("reasoning_budget_message") or "")
    tokenizer = model.tokenizer
    forced = tokenizer.tokenize(message + end, add_bos=False, parse_special=True)

    def piece(token_id: int) -> bytes:
        return tokenizer.token_bytes(token_id, special=True)

    return lambda: ReasoningBudget(budget, forced, start, end, piece, starts_inside=split.start_in_reasoning)

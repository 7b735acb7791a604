"""The reasoning budget processor (engine/reasoning_budget.py) over a toy vocabulary: it counts
reasoning tokens, forces the message and end tag when the budget is spent, leaves the output
free otherwise, and replays correctly after a rewind."""

from __future__ import annotations

import numpy as np
import pytest

from kodkod.engine.reasoning_budget import ReasoningBudget

VOCAB = ["<think>", "</think>", "a", "b", " ok", "</", "think>", "Done."]
ID = {t: i for i, t in enumerate(VOCAB)}


def piece(token_id: int) -> bytes:
    return VOCAB[token_id].encode()


def run(proc: ReasoningBudget, wanted: list[str]) -> list[str]:
    """Generate: each step the model 'wants' the next token of `wanted` (the highest logit);
    the processor may overrule it. Returns what was actually chosen."""
    out: list[int] = []
    for w in wanted:
        row = np.zeros(len(VOCAB), np.float32)
        row[ID[w]] = 5.0
        proc.process(row, out)
        token = int(row.argmax())
        proc.accept(token)
        out.append(token)
    return [VOCAB[t] for t in out]


def budget(n: int, *, inside: bool, forced: tuple[str, ...] = ("Done.", "</think>")) -> ReasoningBudget:
    return ReasoningBudget(n, [ID[t] for t in forced], "<think>", "</think>", piece, starts_inside=inside)


def test_forces_the_message_and_end_tag_after_the_budget() -> None:
    got = run(budget(3, inside=True), ["a", "b", "a", "b", "b", "a", " ok"])
    assert got == ["a", "b", "a", "Done.", "</think>", "a", " ok"]


def test_counts_from_the_generated_start_tag() -> None:
    got = run(budget(2, inside=False), ["a", "<think>", "b", "b", "b", "b", "a"])
    assert got == ["a", "<think>", "b", "b", "Done.", "</think>", "a"]


def test_a_reasoning_block_closed_in_time_is_left_alone() -> None:
    wanted = ["a", "</", "think>", "b", "b", "b", "b"]  # the end tag split over two tokens
    assert run(budget(3, inside=True), wanted) == wanted


def test_no_start_tag_means_no_budget() -> None:
    wanted = ["a", "b", "a", "b", "a"]
    assert run(budget(1, inside=False), wanted) == wanted


def test_zero_budget_forces_at_once_and_an_empty_message_forces_only_the_end_tag() -> None:
    assert run(budget(0, inside=True, forced=("</think>",)), ["a", "b"]) == ["</think>", "b"]


def test_forcing_wins_even_over_a_banned_looking_row() -> None:
    proc = budget(0, inside=True)
    row = np.full(len(VOCAB), -np.inf, np.float32)  # an earlier stage masked everything
    proc.process(row, [])
    assert int(row.argmax()) == ID["Done."] and np.isfinite(row[ID["Done."]])
    assert np.isinf(row[[i for i in range(len(VOCAB)) if i != ID["Done."]]]).all()


def test_rollback_replays_the_phase() -> None:
    proc = budget(2, inside=True)
    got = run(proc, ["a", "b", "b"])
    assert got == ["a", "b", "Done."]
    proc.rollback_to([ID["a"]])  # a rewind cut the output back to one token
    row = np.zeros(len(VOCAB), np.float32)
    row[ID["b"]] = 5.0
    proc.process(row, [ID["a"]])
    assert int(row.argmax()) == ID["b"]  # one more free reasoning token, then forcing again
    proc.accept(ID["b"])
    row = np.zeros(len(VOCAB), np.float32)
    proc.process(row, [ID["a"], ID["b"]])
    assert int(row.argmax()) == ID["Done."]


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        budget(-1, inside=True)

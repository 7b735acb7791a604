"""Token-mask constraints: the numpy masking with a fake matcher, and llguidance grammars over
the default model's real vocabulary (loaded vocab-only, no weights)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kodkod.core.constraints import (
    DelayedConstraint,
    GrammarError,
    GrammarKind,
    GrammarSpec,
    MaskConstraint,
)


class FakeMatcher:
    """Allows exactly the tokens in `allowed[step]`; stops after the last step."""

    def __init__(self, allowed: list[set[int]]) -> None:
        self.allowed = allowed
        self.step = 0

    def fill_mask(self, words: np.ndarray) -> None:
        words[:] = 0
        for t in self.allowed[self.step]:
            words[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def consume(self, token_id: int) -> bool:
        ok = token_id in self.allowed[self.step]
        self.step += 1
        return ok

    def is_stopped(self) -> bool:
        return self.step >= len(self.allowed)

    def rollback(self, num_tokens: int) -> bool:
        self.step -= num_tokens
        return True


def test_mask_constraint_bans_everything_else() -> None:
    n = 100
    c = MaskConstraint(FakeMatcher([{0, 31, 32, 63, 99}, {5}]), n)
    row = np.arange(n, dtype=np.float32)
    c.process(row, [])
    assert set(np.flatnonzero(np.isfinite(row))) == {0, 31, 32, 63, 99}
    assert row[99] == 99.0  # allowed logits untouched
    c.accept(31)
    assert not c.is_done()
    c.accept(5)
    assert c.is_done()


def test_mask_constraint_pads_and_breaks() -> None:
    c = MaskConstraint(FakeMatcher([{1}, {2}]), 40)
    row = np.zeros(48, dtype=np.float32)  # output row wider than the vocabulary
    c.process(row, [])
    assert list(np.flatnonzero(np.isfinite(row))) == [1]
    c.accept(7)  # not allowed: the constraint ends the sequence instead of continuing
    assert c.is_done()


def test_delayed_constraint_waits_for_marker() -> None:
    pieces = {1: b"abc", 2: b"</th", 3: b"ink>", 4: b"x"}
    inner = MaskConstraint(FakeMatcher([{4}]), 8)
    c = DelayedConstraint(inner, "</think>", lambda t: pieces[t])
    row = np.zeros(8, dtype=np.float32)
    c.process(row, [])
    assert np.isfinite(row).all()
    for t in (1, 2, 3):
        c.accept(t)
    assert c.active and not c.is_done()
    c.process(row, [])
    assert list(np.flatnonzero(np.isfinite(row))) == [4]
    c.accept(4)
    assert c.is_done()


def test_rollback_to_output() -> None:
    matcher = FakeMatcher([{1}, {2}, {3}])
    c = MaskConstraint(matcher, 8)
    for t in (1, 2):
        c.accept(t)
    c.rollback_to([1])  # the engine cut the output back to one token
    row = np.zeros(8, dtype=np.float32)
    c.process(row, [1])
    assert list(np.flatnonzero(np.isfinite(row))) == [2]


def test_delayed_rollback_before_the_marker() -> None:
    pieces = {1: b"</think>", 2: b"a", 4: b"x"}
    inner = MaskConstraint(FakeMatcher([{4}, {4}]), 8)
    c = DelayedConstraint(inner, "</think>", lambda t: pieces[t])
    for t in (2, 1, 4):
        c.accept(t)
    c.rollback_to([2, 1])  # still after the marker: the inner constraint undoes one token
    row = np.zeros(8, dtype=np.float32)
    c.process(row, [2, 1])
    assert list(np.flatnonzero(np.isfinite(row))) == [4]
    c.rollback_to([2])  # before the marker: free again
    assert not c.active
    c.process(row := np.zeros(8, dtype=np.float32), [2])
    assert np.isfinite(row).all()
    c.accept(1)
    assert c.active


# -- llguidance over the real vocabulary ---------------------------------------------------


@pytest.fixture(scope="module")
def compiler(default_gguf: Path) -> Iterator[object]:
    from kodkod.backends.llamacpp.grammar import LlgCompiler
    from kodkod.backends.llamacpp.model import LlamaModel

    model = LlamaModel.load(default_gguf, "vocab", vocab_only=True)
    yield LlgCompiler(model)
    model.close()


def _drive(compiler: object, spec: GrammarSpec, text: str) -> tuple[bool, MaskConstraint]:
    """Feed `text` token by token; True if every token was allowed by the mask."""
    constraint = compiler.compile(spec).new()  # type: ignore[attr-defined]
    ids = compiler.tokenizer.tokenize_str(text)  # type: ignore[attr-defined]
    for t in ids:
        row = np.zeros(compiler.tokenizer.vocab_size, dtype=np.float32)  # type: ignore[attr-defined]
        constraint.process(row, [])
        if not np.isfinite(row[t]):
            return False, constraint
        constraint.accept(t)
    return True, constraint


SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "s": {"enum": ["a", "b"]}},
    "required": ["n", "s"],
    "additionalProperties": False,
}


def test_json_schema_masks(compiler: object) -> None:
    spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    ok, c = _drive(compiler, spec, '{"n":12,"s":"b"}')
    assert ok and c.is_done()
    assert not _drive(compiler, spec, '{"n":12,"s":"c"}')[0]
    assert not _drive(compiler, spec, '{"x":1}')[0]


def test_eos_only_when_accepting(compiler: object) -> None:
    spec = GrammarSpec(GrammarKind.REGEX, "[0-9]+")
    c = compiler.compile(spec).new()  # type: ignore[attr-defined]
    eos = 2  # <|im_end|>
    row = np.zeros(49152, dtype=np.float32)
    c.process(row, [])
    assert not np.isfinite(row[eos])
    c.accept(compiler.tokenizer.tokenize_str("7")[0])  # type: ignore[attr-defined]
    row = np.zeros(49152, dtype=np.float32)
    c.process(row, [])
    assert np.isfinite(row[eos]) and not c.is_done()


def test_regex_lark_and_gbnf(compiler: object) -> None:
    assert _drive(compiler, GrammarSpec(GrammarKind.REGEX, r"[A-Z]{3}-\d{2}"), "ABC-12")[1].is_done()
    assert not _drive(compiler, GrammarSpec(GrammarKind.REGEX, r"[A-Z]{3}"), "abc")[0]
    gbnf = GrammarSpec(GrammarKind.GBNF, 'root ::= "yes" | "no"')
    assert _drive(compiler, gbnf, "no")[1].is_done()
    lark = GrammarSpec(GrammarKind.LARK, 'start: "<tool_call>" %json {"type": "integer"}')
    assert _drive(compiler, lark, "<tool_call>42")[0]


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec(GrammarKind.REGEX, "["),
        GrammarSpec(GrammarKind.JSON_SCHEMA, "not json"),
        GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type": "string", "format": "no-such-format"}'),
        GrammarSpec(GrammarKind.GBNF, "root ::= undefined_rule"),
        GrammarSpec(GrammarKind.LARK, "start: ("),
    ],
)
def test_bad_grammars_raise(compiler: object, spec: GrammarSpec) -> None:
    with pytest.raises(GrammarError):
        compiler.compile(spec)  # type: ignore[attr-defined]


def test_lenient_schema_ignores_unknown_keywords(compiler: object) -> None:
    spec = GrammarSpec(
        GrammarKind.JSON_SCHEMA, '{"type": "string", "format": "no-such-format"}', lenient=True
    )
    assert _drive(compiler, spec, '"hi"')[1].is_done()


def test_constraints_are_independent_and_cached(compiler: object) -> None:
    spec = GrammarSpec(GrammarKind.REGEX, "ab|cd")
    factory = compiler.compile(spec)  # type: ignore[attr-defined]
    assert compiler.compile(spec) is factory  # type: ignore[attr-defined]
    a, b = factory.new(), factory.new()
    a.accept(compiler.tokenizer.tokenize_str("ab")[0])  # type: ignore[attr-defined]
    row = np.zeros(49152, dtype=np.float32)
    b.process(row, [])  # b is still at the start: "a…" and "c…" tokens allowed
    first = {compiler.tokenizer.tokenize_str(x)[0] for x in ("a", "c")}  # type: ignore[attr-defined]
    assert all(np.isfinite(row[t]) for t in first)


def test_llguidance_rollback(compiler: object) -> None:
    spec = GrammarSpec(GrammarKind.REGEX, "(ab|cd)e")
    c = compiler.compile(spec).new()  # type: ignore[attr-defined]
    tok = compiler.tokenizer  # type: ignore[attr-defined]
    a, c_ = tok.tokenize_str("a")[0], tok.tokenize_str("c")[0]
    c.accept(a)
    c.rollback_to([])
    c.accept(c_)  # allowed again from the start
    assert not c.is_done()
    fresh = compiler.compile(spec).new()  # type: ignore[attr-defined]
    fresh.accept(c_)
    rows = [np.zeros(49152, dtype=np.float32) for _ in range(2)]
    c.process(rows[0], [c_])
    fresh.process(rows[1], [c_])
    assert np.array_equal(np.isfinite(rows[0]), np.isfinite(rows[1]))
    assert not np.isfinite(rows[0][tok.tokenize_str("b")[0]])


def test_constraint_used_from_another_thread(compiler: object) -> None:
    spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(_drive(compiler, spec, '{"n":1,"s":"a"}')[0]))
    thread.start()
    thread.join()
    assert result == [True]

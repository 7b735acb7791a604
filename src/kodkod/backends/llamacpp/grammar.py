"""Grammar-constrained decoding for llama.cpp models, with llguidance.

`LlgCompiler` implements `core.constraints.GrammarCompiler` for one loaded model. Its
llguidance tokenizer is built once from the llama.cpp vocabulary (every token's bytes; control
tokens get llguidance's 0xFF prefix so grammars can never produce them as text; the model's
end-of-generation ids are the EOS set) and shared by every grammar. `compile()` turns a
`GrammarSpec` into an `LlgGrammar` whose `new()` returns a `MaskConstraint` over a fresh copy
of the parser. Compiled grammars are kept in a small LRU (same schema → no recompilation).

Why llguidance: it computes a token mask fast (Earley parser + lexer over a token
trie, drops the GIL), covers JSON Schema (incl. $ref, anyOf, patterns, min/max), regexes, Lark
and GBNF (converted), and is maintained (used by vLLM, SGLang and llama.cpp itself).
llama.cpp's own GBNF sampler needs a Python JSON-schema→GBNF converter and walks every
candidate per token; `benchmarks/constrained_decoding.py --compare-gbnf` measures both.

`compile()` may take milliseconds to seconds for big schemas and drops the GIL: call it from a
worker thread. The compiler must not outlive the model (the tokenizer points into its vocab).
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import llama_cpp as L
import llguidance as llg
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from kodkod.core.constraints import (
    GrammarError,
    GrammarKind,
    GrammarSpec,
    MaskConstraint,
)

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

    from kodkod.backends.llamacpp.model import LlamaModel

CACHE_SIZE = 32
# JSON output without optional whitespace: small models otherwise wander into endless blanks.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}


class LlgMatcher:
    """`TokenMatcher` over an llguidance `LLMatcher`."""

    __slots__ = ("_m",)

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self._m = matcher

    def fill_mask(self, words: np.ndarray) -> None:
        self._m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)

    def consume(self, token_id: int) -> bool:
        return bool(self._m.consume_token(token_id))

    def is_stopped(self) -> bool:
        return bool(self._m.is_stopped())

    def rollback(self, num_tokens: int) -> bool:
        return bool(self._m.rollback(num_tokens))


class LlgGrammar:
    """A compiled grammar (`ConstraintFactory`): each `new()` is an independent constraint."""

    __slots__ = ("_proto", "_n_vocab")

    def __init__(self, proto: llg.LLMatcher, n_vocab: int) -> None:
        self._proto = proto
        self._n_vocab = n_vocab

    def new(self) -> MaskConstraint:
        return MaskConstraint(LlgMatcher(self._proto.deep_copy()), self._n_vocab)


def build_tokenizer(model: LlamaModel) -> llg.LLTokenizer:
    """The llguidance tokenizer for a llama.cpp vocabulary (costly for a large vocabulary)."""
    model.check_open()
    vocab = model.vocab
    control = L.LLAMA_TOKEN_ATTR_CONTROL
    user_defined = L.LLAMA_TOKEN_ATTR_USER_DEFINED
    tokens: list[bytes] = []
    size = 1024
    buf = ctypes.create_string_buffer(size)  # own buffer: model.piece() is the engine's
    for t in range(model.n_vocab):
        n = L.llama_token_to_piece(vocab, t, buf, size, 0, True)
        if n < 0:
            raise GrammarError(f"token {t} is longer than {size} bytes")
        piece = buf.raw[:n]
        attr = L.llama_vocab_get_attr(vocab, t)
        if attr & control or (attr & user_defined and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece  # a special token: never matches grammar text
        tokens.append(piece)
    tokenize_fn = ctypes.cast(L.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    eos = sorted(model.info.eos_ids) or [int(L.llama_vocab_eos(vocab))]
    return llg.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize_fn, eos_token=eos, slices=None
    )


def grammar_source(spec: GrammarSpec) -> str:
    """The llguidance grammar text for a spec (GrammarError if it is not well-formed)."""
    try:
        if spec.kind is GrammarKind.JSON_SCHEMA:
            overrides: JsonCompileOptions | None = {"lenient": True} if spec.lenient else None
            return str(llg.LLMatcher.grammar_from_json_schema(spec.text, JSON_DEFAULTS, overrides))
        if spec.kind is GrammarKind.REGEX:
            return str(llg.LLMatcher.grammar_from_regex(spec.text))
        text = any_to_lark(spec.text) if spec.kind is GrammarKind.GBNF else spec.text
        return str(llg.LLMatcher.grammar_from_lark(text))
    except Exception as exc:  # the GBNF converter raises bare Exceptions
        raise GrammarError(f"invalid {spec.kind.value}: {exc}") from None


class LlgCompiler:
    """`GrammarCompiler` for one llama.cpp model (thread-safe)."""

    def __init__(self, model: LlamaModel) -> None:
        self._model = model
        self._tokenizer: llg.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, LlgGrammar] = OrderedDict()

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = build_tokenizer(self._model)
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> LlgGrammar:
        self._model.check_open()  # ModelClosedError once the model was unloaded
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        tokenizer = self.tokenizer
        source = grammar_source(spec)
        matcher = llg.LLMatcher(tokenizer, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind.value}: {_short(matcher.get_error())}")
        grammar = LlgGrammar(matcher, self._model.n_vocab)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._tokenizer = None


def _short(message: str, limit: int = 600) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + " …"

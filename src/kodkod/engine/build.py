"""Building a `Sequence` (and its CFG group) from a request, on the engine thread.

`new_sequence()` resolves the request's LoRA set, applies token healing (the last prompt token
is removed and re-generated under a mask of the tokens that extend it), sets the length limit
(prompt + max_tokens, capped by max_seq_len), and makes the per-sequence helpers: detokenizer,
stop-string matcher, banned-string guard, loop detector and sampler. A request with
`cfg_scale != 1` gets a shadow sequence for its negative prompt, decoded alongside.
"""

from __future__ import annotations

import logging
from collections.abc import Container

from kodkod.core.types import (
    EosReason,
    ErrorEvent,
    ErrorKind,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Usage,
)
from kodkod.engine.adapters import resolve_adapters
from kodkod.engine.backend import Backend
from kodkod.engine.banned import BannedStringGuard, LoopDetector
from kodkod.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from kodkod.engine.group import cfg_group
from kodkod.engine.healing import HealingMask, healing_candidates
from kodkod.engine.sequence import EventSink, Sequence
from kodkod.engine.stopping import StopStringMatcher


class NullSink:
    """Where a CFG shadow sequence's events go."""

    def push(self, event: Event) -> None:
        pass


_NULL_SINK = NullSink()
log = logging.getLogger(__name__)


def accept_request(
    req: GenerationRequest,
    sink: EventSink,
    backend: Backend,
    max_seq_len: int,
    running: Container[str],
    healing_cache: dict[bytes, list[int]],
    texts: TokenTexts | None = None,
) -> Sequence | None:
    """The sequence for a submitted request, or None when it ends at once (its event pushed):
    a duplicate of an id in `running`, `max_tokens == 0`, or settings the backend refuses.
    `texts`: the backend's shared table of token texts (None: the sequence keeps its own)."""
    if req.request_id in running:
        sink.push(ErrorEvent(f"duplicate request id {req.request_id}", ErrorKind.BAD_REQUEST))
        return None
    if req.max_tokens == 0:
        sink.push(FinishEvent(FinishReason.LENGTH, EosReason.MAX_NEW_TOKENS, Usage(len(req.prompt_ids), 0)))
        return None
    try:
        return new_sequence(req, sink, backend, max_seq_len, healing_cache, texts)
    except Exception as exc:  # bad sampler parameters and the like
        log.warning("request %s refused: %s", req.request_id, exc)
        sink.push(ErrorEvent(f"invalid generation settings: {exc}", ErrorKind.BAD_REQUEST))
        return None


def new_sequence(
    req: GenerationRequest,
    sink: EventSink,
    backend: Backend,
    max_seq_len: int,
    healing_cache: dict[bytes, list[int]],
    texts: TokenTexts | None = None,
) -> Sequence:
    """The sequence for `req` (raises on bad settings: the caller answers 400)."""
    adapter_key = resolve_adapters(backend, req.adapters)  # first: it may refuse the request
    prompt = list(req.prompt_ids)
    strip = ""
    if req.token_healing and len(prompt) > 1:
        piece = backend.token_bytes(prompt[-1], special=False)
        allowed = healing_candidates(backend, piece, healing_cache)
        if piece and len(allowed) > 1:
            prompt.pop()
            strip = piece.decode("utf-8", errors="replace")
            req.processors = [HealingMask(allowed), *req.processors]
    limit = max_seq_len
    if req.max_tokens is not None:
        limit = min(limit, len(prompt) + req.max_tokens + (1 if strip else 0))
    stop_ids = frozenset(set(req.stop_token_ids) | backend.info.eos_ids)
    special = not req.skip_special_tokens
    table = texts.table(special) if texts is not None else None

    def piece_of(t: int, _b: Backend = backend, _s: bool = special) -> bytes:
        return _b.token_bytes(t, special=_s)

    seq = Sequence(
        request=req,
        sink=sink,
        tokens=prompt,
        num_prompt=len(prompt),
        detok=IncrementalDetokenizer(piece_of, table),
        stops=StopStringMatcher(req.stop_strings),
        stop_ids=stop_ids,
        eos_ids=backend.info.eos_ids,
        max_len=limit,
        # like upstream, banned strings give way to a grammar (both would fight over tokens)
        guard=(
            BannedStringGuard(req.banned_strings) if req.banned_strings and req.constraint is None else None
        ),
        loops=LoopDetector(req.loop_detect_window) if req.loop_detect_window > 1 else None,
        strip_prefix=strip,
        adapter_key=adapter_key,
    )
    seq.sampler = backend.new_sampler(req.sampling, prompt)
    if req.cfg_scale != 1.0:
        neg = list(req.negative_prompt_ids or [])
        if not neg and req.negative_prompt:
            neg = backend.tokenize(req.negative_prompt, add_bos=True, parse_special=True)
        if not neg:
            neg = [backend.info.bos_id] if backend.info.bos_id is not None else prompt[:1]
        shadow = Sequence(
            request=req,
            sink=_NULL_SINK,
            tokens=neg,
            num_prompt=len(neg),
            detok=IncrementalDetokenizer(piece_of),
            stops=StopStringMatcher([]),
            stop_ids=stop_ids,
            eos_ids=backend.info.eos_ids,
            max_len=max_seq_len,
            adapter_key=adapter_key,
        )
        cfg_group(seq, shadow)
    return seq

"""What a backend reports in `capabilities` decides what callers offer: LoRA libraries, grammar
compilation and vocabulary fingerprints are wired from the record, never probed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kodkod.api.convert import compile_grammar
from kodkod.api.errors import ApiError
from kodkod.core.backend_types import BackendCapabilities
from kodkod.core.constraints import ConstraintFactory, GrammarKind, GrammarSpec
from kodkod.models.draft import fingerprint_backend
from kodkod.models.lora import attach_library
from tests.engine.test_adapters import FakeHost
from tests.fakes import FakeBackend


def test_a_backend_without_adapters_gets_no_lora_library(tmp_path: Path) -> None:
    assert attach_library(tmp_path, tmp_path / "m.gguf", FakeBackend()) is None


def test_the_library_becomes_the_adapter_hosts_source(tmp_path: Path) -> None:
    host = FakeHost({})
    backend = FakeBackend()
    backend.capabilities = BackendCapabilities(adapters=host)
    library = attach_library(tmp_path, tmp_path / "m.gguf", backend)
    assert library is not None and library.lora_dir == tmp_path
    assert host.source == library.prepared_path
    assert attach_library(None, tmp_path / "m.gguf", backend) is None  # no lora_dir: no library


def test_the_reported_fingerprint_is_used_else_the_token_bytes() -> None:
    backend = FakeBackend()
    by_bytes = fingerprint_backend(backend)
    assert len(by_bytes) == 64 and by_bytes == fingerprint_backend(FakeBackend())
    backend.capabilities = BackendCapabilities(vocab_fingerprint=lambda: "reported")
    assert fingerprint_backend(backend) == "reported"


class _Compiler:
    def __init__(self) -> None:
        self.specs: list[GrammarSpec] = []

    def compile(self, spec: GrammarSpec) -> ConstraintFactory:
        self.specs.append(spec)
        return "factory"  # type: ignore[return-value]


def test_grammars_compile_with_the_reported_compiler_and_are_refused_without_one() -> None:
    spec = GrammarSpec(GrammarKind.REGEX, "[ab]+")
    compiler = _Compiler()
    assert asyncio.run(compile_grammar(compiler, spec)) == "factory"
    assert compiler.specs == [spec]
    with pytest.raises(ApiError) as err:
        asyncio.run(compile_grammar(None, spec))
    assert err.value.status == 400 and "not supported" in err.value.message

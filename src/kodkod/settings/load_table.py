"""The one declaration of every model-load parameter (`LOAD_TABLE`).

Each row (`settings.load_param.LoadParam`) names a key of the `model` or `draft_model` section
once, with its type, bounds, default, description, the surfaces that accept it and what a load
does with it. Derived from it:

- the config sections `ModelSettings` / `DraftModelSettings` (their load keys), hence the CLI
  flags, environment variables, `use_as_default` and `config_sample.yml`;
- the `/v1/model/load` body and its `draft_model` object (`api.admin.load_request`);
- the `tabby_config.yml` blocks (`models.loading`), and the split of merged values into
  `ModelLoadParams` / `DraftParams` fields, chat-layer extras, GPU placement and notes.

Where the surfaces used to differ, TabbyAPI's documented rule won (docs/compatibility.md):
`cache_size` is a positive multiple of 256 everywhere, `rope_scale` positive everywhere,
`max_batch_size` 1..256 and `draft_num_tokens` 1..32 everywhere, `draft_rope_alpha` takes
"auto" like `rope_alpha`, and `cache_mode`, `rope_alpha`, `tensor_parallel_backend` and
`backend` are checked by the same rule on every surface (a 422 in a load request).

GPU fields (`Use.GPU`) and keys that only mean something to exllamav2/v3 (`Use.IGNORED`) are
accepted everywhere; a load that sets one says once, in the log and in the progress stream,
what it did instead (the row's `note`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from kodkod.settings.cache_mode import normalise_cache_mode
from kodkod.settings.load_checks import EXLLAMA_BACKENDS, check_backend, check_rpc_servers
from kodkod.settings.load_param import (
    NOT_IN_REQUEST,
    DeviceAmounts,
    LoadParam,
    RopeAlpha,
    Section,
    Surface,
    Use,
    lower,
)

NO_DEVICES = "this llama.cpp build has no GPU devices to place the model on; it runs on the CPU"


P = LoadParam
E = functools.partial(LoadParam, surfaces=NOT_IN_REQUEST, use=Use.EXTRA)  # chat-layer keys
D = Section.DRAFT

LOAD_TABLE: tuple[LoadParam, ...] = (
    # ---- model ------------------------------------------------------------------------------
    P(
        "backend",
        str,
        None,
        "Inference backend; null picks it automatically (llama.cpp). TabbyAPI's exllamav2 / "
        "exllamav3 are accepted and load with llama.cpp.",
        use=Use.CHECK,
        before=check_backend,
        note="this server runs GGUF models on llama.cpp; the model loads with llama.cpp",
        noted=lambda v: v in EXLLAMA_BACKENDS,
    ),
    P(
        "max_seq_len",
        int,
        None,
        "Longest context (prompt plus output) of one request, in tokens. Null uses the "
        "model's own context length; -1 forces it.",
        ge=-1,
    ),
    P(
        "override_base_seq_len",
        int,
        None,
        "Legacy key from older TabbyAPI versions; accepted and ignored.",
        use=Use.IGNORED,
        note="a legacy TabbyAPI key with no effect",
    ),
    P(
        "cache_size",
        int,
        None,
        "Total tokens in the KV cache shared by all running requests; a positive multiple of "
        "256. Null makes it max_seq_len.",
        multiple_of=256,
    ),
    P(
        "cache_mode",
        str,
        "FP16",
        "KV cache precision: FP16, Q8, Q6, Q4, or a 'K,V' pair of bit widths such as '8,8'.",
        after=normalise_cache_mode,
    ),
    P(
        "tensor_parallel",
        bool,
        False,
        "Split each layer across GPUs.",
        use=Use.GPU,
        note=NO_DEVICES,
    ),
    P(
        "tensor_parallel_backend",
        Literal["native", "nccl"],
        "native",
        "Tensor-parallel transport: native or nccl.",
        use=Use.GPU,
        before=lower,
        note=NO_DEVICES,
    ),
    P(
        "gpu_split_auto",
        bool,
        True,
        "Spread the model over the available GPUs automatically.",
        use=Use.GPU,
        note=NO_DEVICES,
    ),
    P(
        "autosplit_reserve",
        DeviceAmounts,
        [96.0],
        "Megabytes of VRAM to keep free on each GPU when splitting automatically.",
        use=Use.GPU,
        note=NO_DEVICES,
    ),
    P(
        "gpu_split",
        DeviceAmounts,
        [],
        "Gigabytes of VRAM to use on each GPU, in order; turns off gpu_split_auto. With "
        "llama.cpp devices the amounts become proportional tensor_split values.",
        use=Use.GPU,
        note=NO_DEVICES,
    ),
    P(
        "rpc_servers",
        list[str],
        [],
        'llama.cpp RPC workers ("host:port" of `kodkod rpc-worker`) that hold part of the '
        "model's layers; the rest stay on this machine's CPU. gpu_split then gives one amount "
        "per device, this machine's CPU first (default: equal shares). The protocol has no "
        "authentication: use workers on a private network only.",
        use=Use.GPU,
        before=check_rpc_servers,
        note="the load notes each device's share of the layers instead",
        noted=lambda _: False,  # models.placement notes each device (with or without GPUs)
    ),
    P(
        "cpu_moe_offload_layers",
        int,
        0,
        "Number of mixture-of-experts layers whose experts run on the CPU (999 means all).",
        surfaces=NOT_IN_REQUEST,
        use=Use.GPU,
        ge=0,
        note=NO_DEVICES,
    ),
    P("rope_scale", float, 1.0, "Linear RoPE scaling factor (positive).", gt=0),
    P(
        "rope_alpha",
        RopeAlpha,
        None,
        "NTK RoPE alpha: a number, or auto/null to derive it from max_seq_len.",
    ),
    P("chunk_size", int, 2048, "Most prompt tokens processed in one step (chunked prefill).", gt=0),
    P(
        "output_chunking",
        bool,
        True,
        "Grow each request's output cache in chunk_size steps (exllamav3 only; llama.cpp's "
        "shared KV cache needs no output chunks).",
        use=Use.IGNORED,
        note="llama.cpp's shared KV cache needs no output chunks",
    ),
    P(
        "max_batch_size",
        int,
        None,
        "Most requests generated at the same time (1 to 256). Null means 32 in kodkod.",
        ge=1,
        le=256,
    ),
    P("prompt_template", str, None, "Chat template to use instead of the one found with the model."),
    P(
        "num_experts_per_token",
        int,
        None,
        "Legacy key from older TabbyAPI versions; accepted and ignored.",
        use=Use.IGNORED,
        note="a legacy TabbyAPI key; llama.cpp uses the model's own number of experts",
    ),
    P("vision", bool, False, "Load the model's vision component if it has one."),
    E(
        "template_vars_default",
        dict[str, Any],
        {},
        "Chat template variables used unless a request sets them, e.g. {enable_thinking: false}.",
    ),
    E(
        "template_vars_force",
        dict[str, Any],
        {},
        "Chat template variables that override whatever a request sends.",
    ),
    E(
        "force_enable_thinking",
        bool,
        False,
        "Deprecated: same as forcing the template variable enable_thinking: true.",
    ),
    E(
        "reasoning",
        bool,
        False,
        "Split output between reasoning_start_token and reasoning_end_token into reasoning_content.",
    ),
    E(
        "reasoning_start_token",
        str,
        "<think>",
        "Text that opens a reasoning block.",
    ),
    E(
        "reasoning_end_token",
        str,
        "</think>",
        "Text that closes a reasoning block.",
    ),
    P(
        "reasoning_suppress_header",
        str,
        None,
        "Legacy key from older TabbyAPI versions; accepted and ignored.",
        surfaces=NOT_IN_REQUEST,
        use=Use.IGNORED,
        note="a legacy TabbyAPI key with no effect",
    ),
    E(
        "start_in_reasoning",
        Literal["auto", "always", "never"],
        "auto",
        "Whether output starts inside a reasoning block: always, never, or auto (when the "
        "prompt ends with an unclosed start token).",
        before=lower,
    ),
    E(
        "tool_calls_in_reasoning",
        bool,
        True,
        "Parse tool calls that appear inside reasoning.",
    ),
    E(
        "reasoning_budget_tokens",
        int,
        None,
        "Most tokens of reasoning before the block is closed; null or negative means no "
        "limit. Requests may set their own.",
    ),
    E(
        "reasoning_budget_message",
        str,
        None,
        "Text inserted when the reasoning budget runs out.",
    ),
    E(
        "tool_format",
        str,
        None,
        "Tool-call format the model emits (e.g. qwen3_coder, mistral).",
    ),
    E(
        "harmony",
        bool,
        None,
        "Use the Harmony (gpt-oss) reply format; null detects it.",
    ),
    E(
        "muse_glimmer",
        bool,
        None,
        "Use the Muse Glimmer reply format; null detects it.",
    ),
    P(
        "n_threads",
        int,
        None,
        "kodkod extension: CPU threads for llama.cpp; null uses every CPU this process may run on.",
        surfaces=NOT_IN_REQUEST,
        ge=1,
    ),
    P(
        "flash_attention",
        bool,
        True,
        "kodkod extension: use flash attention in llama.cpp.",
        surfaces=NOT_IN_REQUEST,
    ),
    P(
        "batch_invariant",
        bool,
        False,
        "kodkod extension: prefill each prompt alone and never beside running streams, so a "
        "request's output does not depend on the requests running with it (slower with many "
        "concurrent requests); off prefills several prompts in one step beside the streams.",
        surfaces=NOT_IN_REQUEST,
    ),
    P(
        "kv_layout",
        Literal["unified", "per_slot"],
        "unified",
        "kodkod extension: unified keeps one KV pool of cache_size cells that all requests share "
        "(a request may use up to max_seq_len of it). per_slot gives each of max_batch_size slots "
        "its own cache_size / max_batch_size cells (rounded up to 256), like llama-server's -np: "
        "each request attends over its own cells only, which is faster with many concurrent "
        "requests, but no request can be longer than its slot (max_seq_len is capped to it; a "
        "larger max_seq_len set explicitly is refused), and a shared prefix is copied, not shared.",
        surfaces=NOT_IN_REQUEST,
        before=lower,
    ),
    # ---- draft_model ------------------------------------------------------------------------
    P(
        "draft_mode",
        Literal["model", "disabled", "mtp", "ngram"],
        "model",
        "How tokens are drafted: model (a draft model, when draft_model_name is set), ngram "
        "(from text already seen), mtp (the model's own prediction head), or disabled.",
        section=D,
        before=lower,
    ),
    P(
        "draft_model_name",
        str,
        None,
        "Draft model (name inside draft_model_dir); null uses none.",
        section=D,
        aliases=("name",),
        required_in_request=True,
    ),
    P(
        "draft_rope_scale",
        float,
        1.0,
        "Linear RoPE scaling of the draft model (positive).",
        section=D,
        gt=0,
    ),
    P(
        "draft_rope_alpha",
        RopeAlpha,
        None,
        "NTK RoPE alpha of the draft model: a number, or auto/null to derive it.",
        section=D,
    ),
    P(
        "draft_cache_mode",
        str,
        "FP16",
        "KV cache precision of the draft model (FP16, Q8, Q6, Q4, or a 'K,V' pair).",
        section=D,
        after=normalise_cache_mode,
    ),
    P(
        "draft_gpu_split",
        DeviceAmounts,
        [],
        "Gigabytes of VRAM per GPU for the draft model; empty splits automatically.",
        section=D,
        use=Use.GPU,
        note=NO_DEVICES,
    ),
    P(
        "draft_num_tokens",
        int,
        None,
        "Tokens drafted per step (1 to 32); null picks a default.",
        section=D,
        ge=1,
        le=32,
    ),
    P(
        "dynamic_draft",
        bool,
        False,
        "Adapt the number of drafted tokens to how many get accepted.",
        section=D,
    ),
    P(
        "ngram_match_min",
        int,
        2,
        "Shortest repeated n-gram that ngram drafting will follow.",
        section=D,
        ge=1,
    ),
)

BY_NAME: dict[str, LoadParam] = {row.name: row for row in LOAD_TABLE}


def rows(section: Section, surface: Surface | None = None, use: Use | None = None) -> tuple[LoadParam, ...]:
    """The rows of `section` (accepted on `surface`, of `use`, when given)."""
    return tuple(
        r
        for r in LOAD_TABLE
        if r.section is section
        and (surface is None or surface in r.surfaces)
        and (use is None or r.use is use)
    )


def names(section: Section, surface: Surface | None = None) -> frozenset[str]:
    return frozenset(r.name for r in rows(section, surface))


def config_fields(section: Section) -> dict[str, Any]:
    """`create_model` field specs of a config section's load keys."""
    return {r.name: r.config_field() for r in rows(section, Surface.CONFIG)}


def request_fields(section: Section) -> dict[str, Any]:
    """`create_model` field specs of the load request (MODEL) or its draft object (DRAFT)."""
    return {r.name: r.request_field() for r in rows(section, Surface.REQUEST)}

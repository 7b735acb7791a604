"""The `model` section of config.yml: the main model and how it is loaded.

Besides the upstream TabbyAPI keys it has three kodkod extensions, `n_threads`,
`flash_attention` and `unload_grace_s`, and helpers that turn nulls into the values kodkod actually uses.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator

from kodkod.settings.load_bounds import (
    LOAD_BOUNDS,
    CacheSize,
    ChunkSize,
    CpuMoeOffloadLayers,
    MaxBatchSize,
    MaxSeqLen,
    NThreads,
    RopeScale,
)
from kodkod.settings.sections import SectionModel, lower_choice

DEFAULT_MAX_BATCH_SIZE = 32
"""kodkod's batch limit when `model.max_batch_size` is null."""


class ModelSettings(SectionModel):
    """Section `model`: the main model and how it is loaded."""

    model_dir: str = Field("models", description="Folder holding the models (one file or folder per model).")
    inline_model_loading: bool = Field(
        False,
        description="Let admin requests switch models by naming another model in the "
        "request's `model` field.",
    )
    use_dummy_models: bool = Field(
        False, description="List the names in dummy_model_names in /v1/models too."
    )
    dummy_model_names: list[str] = Field(
        default_factory=lambda: ["gpt-3.5-turbo"],
        description="Fake model names that clients may send; they select the loaded model.",
    )
    model_name: str | None = Field(
        None, description="Model (name inside model_dir) to load at startup; null loads none."
    )
    use_as_default: list[str] = Field(
        default_factory=list,
        description="Names of keys in this section and in draft_model whose values also apply "
        "to models loaded through the API, e.g. [max_seq_len, cache_mode].",
    )
    backend: str | None = Field(
        None, description="Inference backend; null picks it automatically (llama.cpp)."
    )
    max_seq_len: MaxSeqLen | None = Field(
        None,
        description="Longest context (prompt plus output) of one request, in tokens. "
        "Null uses the model's own context length; -1 forces it.",
    )
    override_base_seq_len: int | None = Field(
        None, description="Legacy key from older TabbyAPI versions; accepted and ignored."
    )
    cache_size: CacheSize | None = Field(
        None,
        description="Total tokens in the KV cache shared by all running requests; a positive "
        "multiple of 256. Null makes it max_seq_len.",
    )
    cache_mode: str = Field(
        "FP16",
        description="KV cache precision: FP16, Q8, Q6, Q4, or a 'K,V' pair of bit widths such as '8,8'.",
    )
    tensor_parallel: bool = Field(False, description="Split each layer across GPUs.")
    tensor_parallel_backend: str = Field("native", description="Tensor-parallel transport: native or nccl.")
    gpu_split_auto: bool = Field(True, description="Spread the model over the available GPUs automatically.")
    autosplit_reserve: list[float] = Field(
        default_factory=lambda: [96.0],
        description="Megabytes of VRAM to keep free on each GPU when splitting automatically.",
    )
    gpu_split: list[float] = Field(
        default_factory=list,
        description="Gigabytes of VRAM to use on each GPU, in order; turns off gpu_split_auto.",
    )
    cpu_moe_offload_layers: CpuMoeOffloadLayers = Field(
        0,
        description="Number of mixture-of-experts layers whose experts run on the CPU (999 means all).",
    )
    rope_scale: RopeScale = Field(1.0, description="Linear RoPE scaling factor (positive).")
    rope_alpha: float | Literal["auto"] | None = Field(
        None, description="NTK RoPE alpha: a number, or auto/null to derive it from max_seq_len."
    )
    chunk_size: ChunkSize = Field(
        2048, description="Most prompt tokens processed in one step (chunked prefill)."
    )
    output_chunking: bool = Field(True, description="Grow each request's output cache in chunk_size steps.")
    max_batch_size: MaxBatchSize | None = Field(
        None,
        description="Most requests generated at the same time (1 to 256). Null means "
        f"{DEFAULT_MAX_BATCH_SIZE} in kodkod.",
    )
    prompt_template: str | None = Field(
        None, description="Chat template to use instead of the one found with the model."
    )
    num_experts_per_token: int | None = Field(
        None, description="Legacy key from older TabbyAPI versions; accepted and ignored."
    )
    vision: bool = Field(False, description="Load the model's vision component if it has one.")
    template_vars_default: dict[str, Any] = Field(
        default_factory=dict,
        description="Chat template variables used unless a request sets them, e.g. {enable_thinking: false}.",
    )
    template_vars_force: dict[str, Any] = Field(
        default_factory=dict,
        description="Chat template variables that override whatever a request sends.",
    )
    force_enable_thinking: bool = Field(
        False,
        description="Deprecated: same as forcing the template variable enable_thinking: true.",
    )
    reasoning: bool = Field(
        False,
        description="Split output between reasoning_start_token and reasoning_end_token into "
        "reasoning_content.",
    )
    reasoning_start_token: str = Field("<think>", description="Text that opens a reasoning block.")
    reasoning_end_token: str = Field("</think>", description="Text that closes a reasoning block.")
    reasoning_suppress_header: str | None = Field(
        None, description="Legacy key from older TabbyAPI versions; accepted and ignored."
    )
    start_in_reasoning: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Whether output starts inside a reasoning block: always, never, or auto "
        "(when the prompt ends with an unclosed start token).",
    )
    tool_calls_in_reasoning: bool = Field(True, description="Parse tool calls that appear inside reasoning.")
    reasoning_budget_tokens: int | None = Field(
        None,
        description="Most tokens of reasoning before the block is closed; null or negative "
        "means no limit. Requests may set their own.",
    )
    reasoning_budget_message: str | None = Field(
        None, description="Text inserted when the reasoning budget runs out."
    )
    tool_format: str | None = Field(
        None, description="Tool-call format the model emits (e.g. qwen3_coder, mistral)."
    )
    harmony: bool | None = Field(None, description="Use the Harmony (gpt-oss) reply format; null detects it.")
    muse_glimmer: bool | None = Field(None, description="Use the Muse Glimmer reply format; null detects it.")
    n_threads: NThreads | None = Field(
        None,
        description="kodkod extension: CPU threads for llama.cpp; null uses every CPU this "
        "process may run on.",
    )
    flash_attention: bool = Field(True, description="kodkod extension: use flash attention in llama.cpp.")
    unload_grace_s: float = Field(
        10.0,
        ge=0,
        description="kodkod extension: when a model is unloaded or replaced and its generations "
        "have ended, how long to wait for requests that still use it (tokenizing, sending their "
        "last chunks) before the swap goes on anyway; the old model is then freed when the last "
        "of them ends.",
    )

    @field_validator("cache_size")
    @classmethod
    def _check_cache_size(cls, value: int | None) -> int | None:
        return LOAD_BOUNDS["cache_size"].check_multiple(value)

    @field_validator("rope_alpha", mode="before")
    @classmethod
    def _check_rope_alpha(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return "auto"
            try:
                return float(value)
            except ValueError:
                pass
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            return value
        raise ValueError(f"expected a number or 'auto', got {value!r}")

    @field_validator("start_in_reasoning", mode="before")
    @classmethod
    def _lower_start(cls, value: object) -> object:
        return lower_choice(value)

    def effective_n_threads(self) -> int:
        """`n_threads`, or the number of CPUs this process may run on."""
        if self.n_threads is not None:
            return self.n_threads
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    def effective_max_batch_size(self) -> int:
        """`max_batch_size`, or kodkod's default."""
        return self.max_batch_size if self.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE

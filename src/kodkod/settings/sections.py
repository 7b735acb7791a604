"""config.yml sections other than `model` (which lives in `model_section`).

Each section is a pydantic model with every upstream TabbyAPI key, its type and its default. The
`description` of each field is user-facing text: it becomes a comment in `config_sample.yml` and
the help of the CLI flag. Sections drop unknown keys; the loader warns about them first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from kodkod.settings.load_param import Section
from kodkod.settings.load_table import config_fields

API_SERVERS = ("oai", "kobold")
_HOST_NAME = re.compile(r"(\*\.)?([a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])")
_HEADER_TEXT = re.compile(r"[\x20-\x7e]+")
_ORIGIN = re.compile(r"https?://([a-z0-9_.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


class SectionModel(BaseModel):
    """Common behaviour: unknown keys are dropped (the loader warns first), numbers fit strings."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: object, info: ValidationInfo) -> object:
        """pydantic reads `port: true` as 1; a boolean where a number belongs is a mistake."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in (int, float, int | None, float | None):
                kind = "an integer" if annotation in (int, int | None) else "a number"
                raise ValueError(f"expected {kind}, got {str(value).lower()}")
        return value


def lower_choice(value: object) -> object:
    """Literal choices are case-insensitive."""
    return value.lower() if isinstance(value, str) else value


class NetworkSettings(SectionModel):
    """Section `network`."""

    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. 127.0.0.1 serves this machine only; "
        "0.0.0.0 serves every network interface.",
    )
    port: int = Field(
        5000,
        ge=1,
        le=65535,
        description="TCP port to listen on. If it is busy, the next free port is tried.",
    )
    disable_auth: bool = Field(
        False,
        description="Serve every request without checking API keys. Only do this on a trusted network.",
    )
    disable_fetch_requests: bool = Field(
        False, description="Refuse to download images that requests reference by URL."
    )
    send_tracebacks: bool = Field(
        False,
        description="Put Python tracebacks into error events sent to clients (for debugging).",
    )
    api_servers: list[str] = Field(
        default_factory=lambda: ["OAI"],
        description="Which HTTP APIs to serve: OAI (OpenAI-compatible) and/or Kobold "
        "(KoboldAI-compatible). Case does not matter; an empty list means OAI.",
    )
    sse_ping_interval: int = Field(
        15,
        ge=0,
        description="Seconds between keep-alive comments on idle streaming responses; 0 turns them off.",
    )

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (without port) that requests may address in their Host "
        "header, besides localhost, 127.x.x.x and [::1]; '*.example.com' also matches its "
        "subdomains, '*' allows any. Empty: on a loopback address only loopback names are "
        "accepted (a web page cannot reach the server by DNS rebinding), on any other address "
        "every Host is. List the names a proxy or load balancer in front of the server uses.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web page origins (scheme://host[:port]) whose browser scripts may call "
        "the server, besides pages on localhost / 127.x.x.x / [::1] and the server's own "
        "pages; 'null' admits pages opened from a file, '*' any origin. A request from any "
        "other origin is refused with 403. Empty: any page when keys are required (a page "
        "needs its user's key, like a script), only those local pages with disable_auth. "
        "Credentials (cookies) are never shared: clients send their key in a header.",
    )

    instance_name: str = Field(
        "",
        max_length=200,
        description="Name this server gives itself in the X-Kodkod-Instance header of every "
        "response, so a client behind a load balancer sees which replica answered. Empty: "
        "<machine host name>:<port>.",
    )

    @field_validator("instance_name")
    @classmethod
    def _check_instance_name(cls, value: str) -> str:
        text = value.strip()
        if text and not _HEADER_TEXT.fullmatch(text):
            raise ValueError(f"expected printable ASCII text without control characters, got {value!r}")
        return text

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            host = name.strip().lower().rstrip(".")
            if host != "*" and not _HOST_NAME.fullmatch(host):
                raise ValueError(f"expected a host name without scheme or port, got {name!r}")
            out.append(host)
        return out

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            text = origin.strip().lower().rstrip("/")
            if text not in ("*", "null") and not _ORIGIN.fullmatch(text):
                raise ValueError(
                    f"expected an origin like https://example.com:8080, 'null' or '*', got {origin!r}"
                )
            out.append(text)
        return out

    @field_validator("api_servers")
    @classmethod
    def _check_api_servers(cls, value: list[str]) -> list[str]:
        for name in value:
            if name.lower() not in API_SERVERS:
                raise ValueError(f"expected one of 'OAI', 'Kobold', got {name!r}")
        return value

    def api_server_set(self) -> frozenset[str]:
        """The enabled API servers, lower case; an empty list means {"oai"}."""
        return frozenset(name.lower() for name in self.api_servers) or frozenset({"oai"})


class LoggingSettings(SectionModel):
    """Section `logging`."""

    log_prompt: bool = Field(
        False,
        description="Log every prompt as the model sees it (chat template applied) and the "
        "text generated for it.",
    )
    log_generation_params: bool = Field(
        False, description="Log the sampling parameters and limits of every generation request."
    )
    log_requests: bool = Field(
        False,
        description="Log method, URL and headers of every HTTP request, plus uvicorn's access "
        "line. API keys and other secrets are shown as <redacted>; prompts are log_prompt's.",
    )
    log_chat_completion_requests: bool = Field(
        False,
        description="Write each chat completion request (API keys removed) and its rendered "
        "prompt to logs/debug/.",
    )
    metrics: bool = Field(
        True,
        description="Serve Prometheus metrics at GET /metrics (needs an API key unless auth is off) "
        "and count them; false: no /metrics route and nothing recorded.",
    )


class _DraftServerKeys(SectionModel):
    """The `draft_model` keys that are not load parameters."""

    draft_model_dir: str = Field("models", description="Folder holding the draft models.")

    if TYPE_CHECKING:  # the load keys are added from the table at runtime

        def __getattr__(self, name: str) -> Any: ...


if TYPE_CHECKING:
    _DraftFields = _DraftServerKeys
else:
    _DraftFields = create_model(
        "_DraftFields", __base__=_DraftServerKeys, __module__=__name__, **config_fields(Section.DRAFT)
    )


class DraftModelSettings(_DraftFields):
    """Section `draft_model`: speculative decoding (load keys from `settings.load_table`)."""


class LoraSpec(BaseModel):
    """One LoRA adapter to load at startup."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    name: str
    scaling: float = Field(1.0, ge=0)


class LoraSettings(SectionModel):
    """Section `lora`."""

    lora_dir: str = Field("loras", description="Folder holding LoRA adapters.")
    loras: list[LoraSpec] | None = Field(
        None,
        description="Adapters to load after the startup model, as a list of "
        "{name: <name in lora_dir>, scaling: <weight, default 1.0>}.",
    )


class EmbeddingsSettings(SectionModel):
    """Section `embeddings`."""

    embedding_model_dir: str = Field("models", description="Folder holding embedding models.")
    embeddings_device: Literal["cpu", "auto", "cuda"] = Field(
        "cpu", description="Device for embedding models: cpu, auto or cuda."
    )
    embedding_model_name: str | None = Field(
        None, description="Embedding model to load at startup; null loads none."
    )
    max_embedding_inputs: int = Field(
        2048, ge=1, description="Most inputs one /v1/embeddings request may hold (kodkod extension)."
    )
    embedding_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="Scheduling niceness of the embedding threads (Linux; kodkod extension): "
        "above 0 running chat streams get the cores first and embeddings take what is left; "
        "0 shares them equally.",
    )

    @field_validator("embeddings_device", mode="before")
    @classmethod
    def _lower_device(cls, value: object) -> object:
        return lower_choice(value)


class SamplingSettings(SectionModel):
    """Section `sampling`."""

    override_preset: str | None = Field(
        None,
        description="Sampler preset from sampler_overrides/<name>.yml supplying defaults "
        "for requests; null uses none.",
    )


class MemorySettings(SectionModel):
    """Section `memory`: host-RAM caches."""

    sysmem_recurrent_cache: int = Field(
        4096, ge=0, description="Megabytes of host RAM for recurrent-model state caching."
    )
    sysmem_kv_cache: int = Field(
        0,
        ge=0,
        description="Megabytes of host RAM for a second-tier prefix cache: idle cached prompts "
        "pushed out of the live KV pool (they slow every decode down while they sit there) are "
        "kept here and restored instead of recomputed; 0 turns it off (the sample config sets "
        "1024).",
    )
    cuda_malloc_async: bool = Field(True, description="Use CUDA's asynchronous allocator.")


class LimitsSettings(SectionModel):
    """Section `limits`: bounds on what one client can make the server hold or do."""

    max_request_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest HTTP request body in bytes; a bigger one is refused with 413 before "
        "it is read (and before the API key is checked).",
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers after it "
        "connects (or starts the next request on a kept-alive connection); slower ones are "
        "disconnected.",
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="Largest request line plus headers in bytes; a bigger one is refused with 431.",
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        description="Seconds an idle keep-alive connection stays open between requests.",
    )
    max_concurrent_connections: int = Field(
        1024,
        ge=0,
        description="Open connections plus running HTTP exchanges the server accepts at once; "
        "beyond that new requests get 503. 0 means no limit.",
    )
    max_choices_per_request: int = Field(
        128,
        ge=1,
        description="Most choices one completion request may ask for (number of prompts times "
        "n); more is refused with 400.",
    )
    max_waiting_requests: int = Field(
        512,
        ge=0,
        description="Most generation requests (each choice counts) that may wait for a place "
        "in the batch (beyond model.max_batch_size running ones); more are refused with 429 "
        "and a Retry-After header.",
    )
    queue_full_retry_after_s: int = Field(
        1,
        ge=0,
        description="Seconds the Retry-After header of a 429 (queue full) answer suggests.",
    )
    max_logprobs: int = Field(
        20,
        ge=0,
        description="Most alternatives per token a request may ask for with logprobs / "
        "top_logprobs; more is refused with 400.",
    )
    max_stop_strings: int = Field(
        64, ge=0, description="Most stop strings (stop) one request may send; more is a 400."
    )
    max_stop_string_chars: int = Field(
        1000, ge=1, description="Longest stop string in characters; a longer one is a 400."
    )
    max_banned_strings: int = Field(
        256, ge=0, description="Most banned strings one request may send; more is a 400."
    )
    max_banned_string_chars: int = Field(
        1000, ge=1, description="Longest banned string in characters; a longer one is a 400."
    )
    stalled_stream_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a streaming client may leave generated output unread (it keeps "
        "the connection but stops reading) before its request is aborted and its KV freed.",
    )
    offload_tokenize_chars: int = Field(
        4096,
        ge=0,
        description="Prompts longer than this (characters) are tokenized and chat templates "
        "with more text are rendered in a worker thread, so other streams never stall; 0 "
        "always uses a worker thread.",
    )
    engine_stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds one engine step (one batched decode) may take before the server "
        "reports the engine as stuck: /health answers 503 and new generation requests are "
        "refused with 503 until it moves again.",
    )


class DeveloperSettings(SectionModel):
    """Section `developer`."""

    unsafe_launch: bool = Field(False, description="Skip the backend version check.")
    disable_request_streaming: bool = Field(
        False, description="Answer streaming requests with a single complete response."
    )
    cuda_malloc_backend: bool = Field(
        False, description="Legacy key from older TabbyAPI versions; accepted and ignored."
    )
    uvloop: bool = Field(False, description="Legacy key from older TabbyAPI versions; accepted and ignored.")
    realtime_process_priority: bool = Field(
        False, description="Raise the server process to the highest scheduling priority."
    )
    seqlog: bool = Field(False, description="Send structured logs to a Seq server.")
    seqlog_server_url: str = Field("http://localhost:5341", description="Address of the Seq server.")
    seqlog_api_key: str | None = Field(None, description="API key for the Seq server.")

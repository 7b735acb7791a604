"""The server's services, built once by the app factory and handed to routes by dependencies.

No module holds mutable state: everything a request may touch is a field of `AppState`
(`app.state.kodkod`), one typed field per service, created by `kodkod.app.create_app` and torn
down by its lifespan. Routes never build services; they ask for the one they need with a
dependency declared here (`models: Models`, `presets: Presets`, ...) and translate between
HTTP and service calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from kodkod.api.kobold.jobs import JobTable
from kodkod.api.metrics.service import ServerMetrics
from kodkod.api.presets import OverrideState, SamplerPresets
from kodkod.auth import KeyStore
from kodkod.chat import ChatTemplate, list_templates, load_named_template
from kodkod.models.embeddings import EmbeddingService
from kodkod.models.loading import plan_load
from kodkod.models.manager import LoadedModel, ModelManager
from kodkod.models.params import LoadPlan
from kodkod.settings import Settings

__all__ = [
    "HEALTH_ISSUES_KEPT",
    "AppSettings",
    "AppState",
    "Embeddings",
    "Health",
    "HealthIssue",
    "HealthLog",
    "KoboldJobs",
    "Metrics",
    "Models",
    "OverrideState",
    "Paths",
    "Presets",
    "ServerPaths",
    "State",
    "TemplateLibrary",
    "Templates",
    "get_embeddings",
    "get_health",
    "get_kobold_jobs",
    "get_metrics",
    "get_model",
    "get_models",
    "get_paths",
    "get_presets",
    "get_settings",
    "get_state",
    "get_templates",
    "split_issues",
]

HEALTH_ISSUES_KEPT = 100  # the newest fatal faults /health reports


@dataclass(frozen=True, slots=True)
class ServerPaths:
    """The folders the server reads, resolved once (relative settings are under `base_dir`)."""

    base_dir: Path
    model_dir: Path
    draft_model_dir: Path
    lora_dir: Path
    embedding_model_dir: Path
    templates_dir: Path
    overrides_dir: Path

    @classmethod
    def resolve_all(cls, settings: Settings, base_dir: Path) -> ServerPaths:
        def resolve(value: str) -> Path:
            path = Path(value).expanduser()
            return path if path.is_absolute() else base_dir / path

        return cls(
            base_dir=base_dir,
            model_dir=resolve(settings.model.model_dir),
            draft_model_dir=resolve(settings.draft_model.draft_model_dir),
            lora_dir=resolve(settings.lora.lora_dir),
            embedding_model_dir=resolve(settings.embeddings.embedding_model_dir),
            templates_dir=base_dir / "templates",
            overrides_dir=base_dir / "sampler_overrides",
        )


@dataclass(slots=True)
class HealthIssue:
    time: str
    description: str
    at: float = 0.0  # time.time() when recorded


def split_issues(
    issues: list[HealthIssue], loaded_at: float | None
) -> tuple[list[HealthIssue], list[HealthIssue]]:
    """(current, resolved): a fatal fault belongs to the engine it happened in, so issues
    recorded before the current model was loaded are resolved (the server serves again)."""
    since = loaded_at if loaded_at is not None else 0.0
    return [i for i in issues if i.at >= since], [i for i in issues if i.at < since]


@dataclass(slots=True)
class HealthLog:
    """Fatal engine faults, newest last (the model manager reports them; /health lists them)."""

    issues: list[HealthIssue] = field(default_factory=list)

    def record_fatal(self, exc: BaseException) -> None:
        stamp = datetime.now(UTC).isoformat()
        self.issues.append(HealthIssue(stamp, f"{type(exc).__name__}: {exc}", time.time()))
        del self.issues[:-HEALTH_ISSUES_KEPT]

    def split(self, loaded_at: float | None) -> tuple[list[HealthIssue], list[HealthIssue]]:
        return split_issues(self.issues, loaded_at)


@dataclass(frozen=True, slots=True)
class TemplateLibrary:
    """The named prompt templates of `templates/`."""

    directory: Path

    def names(self) -> list[str]:
        return list_templates(self.directory)

    def load(self, name: str) -> ChatTemplate:
        """The template `name` (TemplateFileError / TemplateError when it cannot be used)."""
        return load_named_template(self.directory, name)


@dataclass(slots=True)
class AppState:
    """Every service of one server, one typed field each."""

    settings: Settings
    paths: ServerPaths
    keys: KeyStore
    models: ModelManager
    presets: SamplerPresets
    templates: TemplateLibrary
    kobold_jobs: JobTable
    health: HealthLog
    embeddings: EmbeddingService
    metrics: ServerMetrics | None = None  # None: logging.metrics is off
    started_at: float = field(default_factory=time.time)

    def load_plan(self, name: str, fields: dict[str, Any], *, startup: bool) -> LoadPlan:
        """How `name` would load with `fields` over the config (ModelNameError when it is not
        a model of model_dir; load parameter errors as `plan_load` raises them)."""
        return plan_load(
            self.settings,
            self.paths.model_dir,
            self.paths.draft_model_dir,
            name,
            fields,
            startup=startup,
            gpu_available=self.models.gpu_available,
        )


# -- dependencies ------------------------------------------------------------------------------


def get_state(request: Request) -> AppState:
    return request.app.state.kodkod


def get_settings(request: Request) -> Settings:
    return get_state(request).settings


def get_paths(request: Request) -> ServerPaths:
    return get_state(request).paths


def get_models(request: Request) -> ModelManager:
    return get_state(request).models


def get_presets(request: Request) -> SamplerPresets:
    return get_state(request).presets


def get_templates(request: Request) -> TemplateLibrary:
    return get_state(request).templates


def get_kobold_jobs(request: Request) -> JobTable:
    return get_state(request).kobold_jobs


def get_health(request: Request) -> HealthLog:
    return get_state(request).health


def get_embeddings(request: Request) -> EmbeddingService:
    return get_state(request).embeddings


def get_metrics(request: Request) -> ServerMetrics | None:
    """The server's metrics (record embeddings with `record_embeddings`); None when off."""
    return get_state(request).metrics


def get_model(request: Request) -> LoadedModel:
    """The loaded model, or NoModelLoaded (→ 503). Called in a route's body (not as a
    dependency) so that a malformed request is still a 422 when no model is loaded."""
    return get_state(request).models.require()


State = Annotated[AppState, Depends(get_state)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Paths = Annotated[ServerPaths, Depends(get_paths)]
Models = Annotated[ModelManager, Depends(get_models)]
Presets = Annotated[SamplerPresets, Depends(get_presets)]
Templates = Annotated[TemplateLibrary, Depends(get_templates)]
KoboldJobs = Annotated[JobTable, Depends(get_kobold_jobs)]
Health = Annotated[HealthLog, Depends(get_health)]
Embeddings = Annotated[EmbeddingService, Depends(get_embeddings)]
Metrics = Annotated[ServerMetrics | None, Depends(get_metrics)]

"""The server's state, kept on `app.state.kodkod` and handed to routes by dependencies.

No module holds mutable state: everything a request may touch hangs off `AppState`, created by
the app factory and torn down by its lifespan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request

from kodkod.auth import KeyStore
from kodkod.models.manager import LoadedModel, ModelManager
from kodkod.settings import Settings


@dataclass(slots=True)
class HealthIssue:
    time: str
    description: str
    at: float = 0.0  # time.time() when recorded


@dataclass(slots=True)
class OverrideState:
    """Sampler override presets: param → {override, force, additive}."""

    selected_preset: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class AppState:
    settings: Settings
    keys: KeyStore
    models: ModelManager
    base_dir: Path  # where templates/, sampler_overrides/ live
    overrides: OverrideState = field(default_factory=OverrideState)
    health_issues: list[HealthIssue] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)  # per-feature state (e.g. kobold jobs)

    @property
    def model_dir(self) -> Path:
        return self.resolve_path(self.settings.model.model_dir)

    @property
    def lora_dir(self) -> Path:
        return self.resolve_path(self.settings.lora.lora_dir)

    @property
    def templates_dir(self) -> Path:
        return self.base_dir / "templates"

    @property
    def overrides_dir(self) -> Path:
        return self.base_dir / "sampler_overrides"

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def record_fatal(self, exc: BaseException) -> None:
        stamp = datetime.now(UTC).isoformat()
        self.health_issues.append(HealthIssue(stamp, f"{type(exc).__name__}: {exc}", time.time()))
        del self.health_issues[:-100]


def split_issues(
    issues: list[HealthIssue], loaded_at: float | None
) -> tuple[list[HealthIssue], list[HealthIssue]]:
    """(current, resolved): a fatal fault belongs to the engine it happened in, so issues
    recorded before the current model was loaded are resolved (the server serves again)."""
    since = loaded_at if loaded_at is not None else 0.0
    return [i for i in issues if i.at >= since], [i for i in issues if i.at < since]


def get_state(request: Request) -> AppState:
    return request.app.state.kodkod


def get_model(request: Request) -> LoadedModel:
    """The loaded model, or NoModelLoaded (→ 503)."""
    return get_state(request).models.require()

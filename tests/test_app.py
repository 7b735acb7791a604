"""The app factory builds every service once and the routes use those (kodkod.app, api.state).

In-process app without a model (no backend is ever loaded): what the admin endpoints show is
what the factory's services hold — the startup preset, the preset and template folders under
the base directory, and the model and draft folders resolved from the settings.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from kodkod.app import build_state, create_app
from kodkod.auth import KeyStore
from kodkod.settings import Settings

PRESET = "temperature:\n  override: 0.25\n  force: true\n"


def client(tmp_path: Path, settings: Settings) -> TestClient:
    app = create_app(
        settings, keys=KeyStore(tmp_path / "keys.yml", disabled=True), backend_loader=None, base_dir=tmp_path
    )  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1")


def test_the_startup_preset_is_active_and_the_override_endpoints_change_it(tmp_path: Path) -> None:
    (tmp_path / "sampler_overrides").mkdir()
    (tmp_path / "sampler_overrides" / "cool.yml").write_text(PRESET)
    (tmp_path / "sampler_overrides" / "other.yml").write_text("top_k:\n  override: 7\n")
    settings = Settings.model_validate({"sampling": {"override_preset": "cool"}})
    with client(tmp_path, settings) as c:
        listed = c.get("/v1/sampling/override/list").json()
        assert listed["selected_preset"] == "cool"
        assert listed["overrides"]["temperature"]["override"] == 0.25
        assert listed["presets"] == ["cool", "other"]
        assert c.post("/v1/sampling/override/switch", json={"preset": "other"}).status_code == 200
        assert c.get("/v1/sampling/override/list").json()["selected_preset"] == "other"
        r = c.post("/v1/sampling/override/switch", json={"overrides": {"min_p": {"override": 0.1}}})
        assert r.status_code == 200
        listed = c.get("/v1/sampling/override/list").json()
        assert listed["selected_preset"] is None and list(listed["overrides"]) == ["min_p"]
        assert c.post("/v1/sampling/override/switch", json={"preset": "nope"}).status_code == 400
        assert c.post("/v1/sampling/override/unload").status_code == 200
        assert c.get("/v1/sampling/override/list").json()["overrides"] == {}


def test_a_missing_startup_preset_leaves_no_overrides(tmp_path: Path) -> None:
    settings = Settings.model_validate({"sampling": {"override_preset": "missing"}})
    with client(tmp_path, settings) as c:
        listed = c.get("/v1/sampling/override/list").json()
        assert listed["selected_preset"] is None and listed["overrides"] == {}


def test_listings_read_the_folders_the_factory_resolved(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.jinja").write_text("{{ messages }}")
    (tmp_path / "weights" / "drafts").mkdir(parents=True)
    (tmp_path / "weights" / "big.gguf").write_bytes(b"GGUF")
    (tmp_path / "weights" / "drafts" / "small.gguf").write_bytes(b"GGUF")
    settings = Settings.model_validate(
        {
            "model": {"model_dir": "weights"},
            "draft_model": {"draft_model_dir": "weights/drafts"},
        }
    )
    with client(tmp_path, settings) as c:
        assert c.get("/v1/template/list").json()["data"] == ["mine"]
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models == ["big"]  # the draft folder inside model_dir is not listed as a model
        assert [m["id"] for m in c.get("/v1/model/draft/list").json()["data"]] == ["small"]


def test_relative_folders_resolve_under_the_base_directory(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "model": {"model_dir": "m"},
            "lora": {"lora_dir": "~/adapters"},
            "draft_model": {"draft_model_dir": str(tmp_path / "abs")},
        }
    )
    state = build_state(settings, KeyStore(tmp_path / "k.yml", disabled=True), None, tmp_path)  # type: ignore[arg-type]
    assert state.paths.model_dir == tmp_path / "m"
    assert state.paths.lora_dir == Path("~/adapters").expanduser()
    assert state.paths.draft_model_dir == tmp_path / "abs"
    assert state.presets.directory == tmp_path / "sampler_overrides"
    assert state.templates.directory == tmp_path / "templates"

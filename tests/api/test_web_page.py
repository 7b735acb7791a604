"""The web page's routes (kodkod.api.web_page, kodkod.web) in process, keys on, no model.

The page and its files need no key and carry a strict Content-Security-Policy; only the named
files exist; the API the page calls still needs a key; the page's own same-origin calls pass the
Host/Origin guard even where foreign pages are refused; the files hold no inline script or
style (the policy would block it) and never write to the console.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from kodkod.app import create_app
from kodkod.auth import KeyStore
from kodkod.settings import Settings
from kodkod.web import ASSETS, asset

API_KEY = "0123456789abcdef0123456789abcdef"
ADMIN_KEY = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    path = tmp_path / "api_tokens.yml"
    path.write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY}))
    path.chmod(0o600)
    keys = KeyStore(path, disabled=False)
    keys.load_or_create()
    # foreign pages limited to one origin: the page's own same-origin calls must still pass
    settings = Settings.model_validate({"network": {"cors_origins": ["https://allowed.example"]}})
    app = create_app(settings, keys=keys, backend_loader=None, base_dir=tmp_path)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1:5000")


def test_the_page_and_its_files_need_no_key_and_carry_a_strict_policy(client: TestClient) -> None:
    paths = ["/", *(f"/web/{name}" for name in ASSETS)]
    for path in paths:
        r = client.get(path)
        assert r.status_code == 200, path
        policy = r.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "style-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert client.get("/web/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/web/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    "path",
    [
        "/web/__init__.py",
        "/web/..%2f__init__.py",
        "/web/%2e%2e/app.py",
        "/web/app.js%00",
        "/web/",
        "/web/APP.JS",
    ],
)
def test_only_the_page_files_exist(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert "error" in r.json() or "detail" in r.json()


def test_what_the_page_calls_still_needs_a_key(client: TestClient) -> None:
    assert client.get("/v1/model/list").status_code == 401
    assert client.get("/v1/model/list", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.post("/v1/model/unload", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401


def test_the_pages_own_calls_pass_the_origin_guard_and_foreign_pages_do_not(client: TestClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    own = client.post("/v1/sampling/override/unload", headers={**admin, "Origin": "http://127.0.0.1:5000"})
    assert own.status_code == 200
    foreign = client.post("/v1/sampling/override/unload", headers={**admin, "Origin": "https://evil.example"})
    assert foreign.status_code == 403


def test_the_html_has_no_inline_script_or_style_and_names_only_served_files() -> None:
    found = asset("index.html")
    assert found is not None
    html = found.body.decode()
    assert "<style" not in html
    assert not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html)  # inline event handlers
    for script in re.findall(r"<script\b[^>]*>", html):
        assert 'src="/web/' in script
    linked = re.findall(r'(?:src|href)="/web/([^"]+)"', html)
    assert linked and all(name in ASSETS for name in linked)
    for testid in ("api-key", "chat-input", "send", "stop", "model-select", "model-load", "load-progress"):
        assert f'data-testid="{testid}"' in html
    assert 'data-testid="tokens-per-second"' in html


def test_the_scripts_never_log_and_keep_keys_in_session_storage_only() -> None:
    for name in ASSETS:
        if not name.endswith(".js"):
            continue
        found = asset(name)
        assert found is not None
        text = found.body.decode()
        assert not re.search(r"\bconsole\s*\.", text), name
        assert "localStorage" not in text, name
        assert "document.cookie" not in text, name
        assert "innerHTML" not in text, name  # replies are text, never markup

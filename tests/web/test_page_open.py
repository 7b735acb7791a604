"""The web page on a server without keys (`network.disable_auth`) that answers in one piece
(`developer.disable_request_streaming`): the page says no key is needed, chats without one, shows
the whole reply, and opens the admin panel. A second small server, in headless Chromium.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server import KodkodServer
from tests.web.browser import Page, open_browser, wait_for

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, default_gguf: object) -> Iterator[KodkodServer]:
    config = {"network": {"disable_auth": True}, "developer": {"disable_request_streaming": True}}
    srv = KodkodServer.start(tmp_path_factory.mktemp("kodkod-open"), config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(open_server: KodkodServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    with open_browser(tmp_path_factory.mktemp("browser-open"), open_server.base_url + "/") as opened:
        yield opened


def test_without_keys_the_page_chats_and_shows_a_reply_sent_in_one_piece(page: Page) -> None:
    wait_for("the no-key notice", lambda: "needs no key" in page.text("key-status"), 15)
    page.type("max_tokens", "20")
    page.type("chat-input", "Say hello.")
    page.el("send").click()
    wait_for("the reply", lambda: page.attr("reply", "data-state") in ("done", "error"), 60)
    assert page.attr("reply", "data-state") == "done", page.text("chat-status")
    assert page.text("reply").strip()
    wait_for("the admin panel", lambda: "needs no key" in page.text("admin-status"), 15)
    assert page.el("model-load").is_enabled()
    page.shot("open-server")

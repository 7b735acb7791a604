"""The web page at / in headless Chromium against a real server (Debian's chromium + chromedriver,
driven by Selenium; no browser download).

One server and one browser for the module; the tests run in order on the same page: the API key
is entered once, a chat reply streams in, a long reply shows a tokens/s number and the Stop
button ends it on the server too, the keys never reach the page, a URL or the browser log, and
last the admin loads the Gemma model and watches the progress bar reach 100 %. Screenshots go to
the module's temp dir (the path is printed). Running as root, the test installs the Debian
packages when they are missing; otherwise it skips and says why.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server import ADMIN_KEY, API_KEY, GEMMA_MODEL, KodkodServer, engine_stats, wait_idle
from tests.web.browser import By, Page, Select, open_browser, wait_for

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def page(server: KodkodServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    with open_browser(tmp_path_factory.mktemp("browser"), server.base_url + "/") as opened:
        yield opened


def test_the_page_needs_no_key_and_has_a_strict_policy(server: KodkodServer) -> None:
    r = httpx.get(server.base_url + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    policy = r.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert httpx.get(server.base_url + "/web/app.js", timeout=10).status_code == 200
    assert httpx.get(server.base_url + "/v1/model", timeout=10).status_code == 401


def test_enter_the_key_and_a_chat_reply_streams_in(page: Page) -> None:
    page.type("api-key", API_KEY)
    page.el("keys-save").click()
    wait_for("the key to be taken", lambda: "API key set" in page.text("key-status"), 10)
    page.type("max_tokens", "60")
    page.type("chat-input", "Write a short poem about the sea.")
    page.el("send").click()
    lengths: set[int] = set()

    def finished() -> bool:
        lengths.add(len(page.text("reply")))
        return page.attr("reply", "data-state") in ("done", "error", "stopped")

    wait_for("the reply to finish", finished, 120)
    page.shot("chat-reply")
    assert page.attr("reply", "data-state") == "done", page.text("chat-status")
    reply = page.text("reply")
    assert reply.strip()
    # streamed: the page showed the reply at several lengths before it was complete
    assert len({n for n in lengths if n > 0}) >= 3, lengths
    assert "done" in page.text("chat-status")


def test_markup_is_shown_as_text_and_a_refused_request_is_reported(page: Page) -> None:
    hostile = '<img src=x data-testid="injected"> <b>bold</b> \u0000'
    page.type("max_tokens", "4")
    page.type("temperature", "-1")  # out of range: the server refuses the request
    page.type("chat-input", hostile)
    page.el("send").click()
    wait_for("the refusal", lambda: page.attr("reply", "data-state") == "error", 30)
    status = page.text("chat-status")
    assert status.startswith(("400", "422")) and "temperature" in status, status
    assert not page.driver.find_elements(By.CSS_SELECTOR, '[data-testid="injected"], .messages b')
    users = page.driver.find_elements(By.CSS_SELECTOR, ".msg.user .text")
    assert "<b>bold</b>" in users[-1].text
    assert page.el("send").is_enabled() and not page.el("stop").is_enabled()
    page.el("temperature").clear()
    page.el("chat-clear").click()


def test_a_long_reply_shows_tokens_per_second_and_stop_ends_it(page: Page, server: KodkodServer) -> None:
    before = engine_stats(server)["generated_tokens"]
    max_tokens = 2000
    page.type("max_tokens", str(max_tokens))
    page.el("ban-eos").click()  # no early end: the reply runs until stopped
    page.type("chat-input", "Tell me a very long story about a lighthouse keeper.")
    page.el("send").click()
    wait_for(
        "the reply to stream",
        lambda: page.attr("reply", "data-state") == "streaming" and len(page.text("reply")) > 20,
        60,
    )

    # tokens/s: a number above zero while the reply streams
    def rate() -> float | None:
        value = page.number("tokens-per-second")
        return value if value and page.attr("reply", "data-state") == "streaming" else None

    tokens_per_s = wait_for("tokens/s to show a number while streaming", rate, 30)
    assert tokens_per_s > 0
    page.shot("streaming-tokens-per-second")

    page.el("stop").click()
    wait_for("the reply to stop", lambda: page.attr("reply", "data-state") == "stopped", 10)
    stopped_text = page.text("reply")
    stats = wait_idle(server, timeout_s=30)  # the server cancelled the sequence
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert page.text("reply") == stopped_text  # nothing arrived after Stop
    assert stats["generated_tokens"] - before < max_tokens  # it ended early, not at max_tokens
    assert page.el("send").is_enabled() and not page.el("stop").is_enabled()
    assert "stopped" in page.text("chat-status")
    page.shot("stopped")
    page.el("ban-eos").click()


def test_the_live_view_says_where_its_numbers_come_from(page: Page, server: KodkodServer) -> None:
    metrics = httpx.get(server.base_url + "/metrics", headers=server.headers(), timeout=10)
    expected = "metrics unavailable" if metrics.status_code == 404 else "from /metrics"
    wait_for(f"metrics status {expected!r}", lambda: expected in page.text("metrics-status"), 10)
    wait_for("running to show a number", lambda: page.number("running") is not None, 10)
    wait_for("KV use to show a percentage", lambda: page.text("kv-use").endswith("%"), 10)


def test_keys_stay_out_of_the_page_the_url_and_the_browser_log(page: Page, server: KodkodServer) -> None:
    page.type("admin-key", API_KEY)  # the wrong key: the admin panel stays closed
    page.el("keys-save").click()
    wait_for("the refusal", lambda: "not an admin key" in page.text("admin-status"), 20)
    assert not page.el("model-load").is_enabled()
    page.type("admin-key", ADMIN_KEY)
    page.el("keys-save").click()
    wait_for("the admin key to be accepted", lambda: "accepted" in page.text("admin-status"), 20)
    page.driver.refresh()  # entered once: the tab keeps the keys
    wait_for("the stored keys", lambda: "API key set, admin key set" in page.text("key-status"), 10)
    wait_for("the admin key to be accepted again", lambda: "accepted" in page.text("admin-status"), 20)
    html = page.driver.page_source
    logs = [entry["message"] for entry in page.driver.get_log("browser")]
    for key in (API_KEY, ADMIN_KEY):
        assert key not in html
        assert key not in page.driver.current_url
        assert not any(key in message for message in logs)
        # the server prints the keys once when it starts (as `./start.sh` shows them), never after
        assert key not in server.log().partition("Application startup complete")[2]
    # the page's requests are all same-origin and allowed: no CSP or fetch errors in the log
    assert not any("Content Security Policy" in message for message in logs), logs


def test_admin_switches_the_sampler_preset_and_the_template(page: Page, server: KodkodServer) -> None:
    wait_for("the admin controls", lambda: page.el("preset-switch").is_enabled(), 20)
    presets = wait_for(
        "the preset list",
        lambda: (
            [o.get_attribute("value") for o in Select(page.el("admin-preset-select")).options][1:] or None
        ),
        20,
    )
    assert "safe_defaults" in presets
    Select(page.el("admin-preset-select")).select_by_value("safe_defaults")
    page.el("preset-switch").click()
    wait_for(
        "the sampler panel to name the preset", lambda: "safe_defaults" in page.text("preset-status"), 10
    )
    listed = httpx.get(server.base_url + "/v1/sampling/override/list", headers=server.headers(), timeout=10)
    assert listed.json()["selected_preset"] == "safe_defaults"
    page.el("preset-clear").click()
    wait_for("the preset to be cleared", lambda: page.text("preset-status").startswith("none"), 10)

    Select(page.el("template-select")).select_by_value("chatml")
    page.el("template-switch").click()
    wait_for("the switch to be reported", lambda: "template: chatml" in page.text("admin-result"), 10)
    card = httpx.get(server.base_url + "/v1/model", headers=server.headers(), timeout=10).json()
    assert card["parameters"]["prompt_template"] == "chatml"
    page.shot("admin-switched")


def test_admin_loads_gemma_with_a_progress_bar_to_100_and_the_model_name_changes(
    page: Page, server: KodkodServer
) -> None:
    wait_for("the admin controls", lambda: page.el("model-load").is_enabled(), 20)
    embedding = httpx.get(
        server.base_url + "/v1/model/embedding", headers=server.headers(admin=True), timeout=10
    )
    assert page.el("embedding-panel").is_displayed() == (embedding.status_code != 501)
    options = wait_for(
        "the model list",
        lambda: [o.get_attribute("value") for o in Select(page.el("model-select")).options] or None,
        20,
    )
    assert GEMMA_MODEL in options
    assert page.text("model-name") != GEMMA_MODEL
    Select(page.el("model-select")).select_by_value(GEMMA_MODEL)
    page.el("model-load").click()
    seen: list[str] = []

    def loaded() -> bool:
        value = page.attr("load-progress", "value") or ""
        if not seen or seen[-1] != value:
            seen.append(value)
        return "loaded" in page.text("load-status") or page.attr("load-status", "data-kind") == "error"

    wait_for("the load to finish", loaded, 180)
    print(f"progress values seen by the test: {seen}")
    page.shot("gemma-loaded")
    assert page.attr("load-status", "data-kind") == "ok", page.text("load-status")
    assert page.attr("load-progress", "value") == "100"
    assert [float(v) for v in seen if v] == sorted(float(v) for v in seen if v)  # it only moved forward
    wait_for("the model name to change", lambda: page.text("model-name") == GEMMA_MODEL, 10)
    card = httpx.get(server.base_url + "/v1/model", headers=server.headers(), timeout=10).json()
    assert card["id"] == GEMMA_MODEL


# Stands in for the Prometheus endpoint another branch adds: answers /metrics (with the API key
# only) in the text format with the metric names the page reads; the generated-token counter
# grows at 50 tokens per second of page time.
FAKE_METRICS = """
(() => {
  const realFetch = window.fetch.bind(window);
  window.fetch = (input, init = {}) => {
    if (String(input) !== "/metrics") return realFetch(input, init);
    const auth = (init.headers || {}).Authorization || "";
    if (auth !== "Bearer " + window.sessionStorage.getItem("kodkod.apiKey")) {
      return Promise.resolve(new Response("{}", { status: 401 }));
    }
    const tokens = Math.round(performance.now() / 1000 * 50);
    const body = [
      "# TYPE kodkod:generation_tokens_total counter",
      `kodkod:generation_tokens_total{model_name="m"} ${tokens}`,
      'kodkod:generation_tokens_created{model_name="m"} 1.7e9',
      'kodkod:num_requests_running{model_name="m"} 3',
      'kodkod:num_requests_waiting{model_name="m"} 2',
      'kodkod:kv_cache_usage_perc{model_name="m"} 0.25',
      "",
    ].join("\\n");
    return Promise.resolve(new Response(body, { status: 200, headers: { "Content-Type": "text/plain" } }));
  };
})();
"""


def test_the_live_view_prefers_prometheus_metrics_when_the_server_has_them(page: Page) -> None:
    page.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FAKE_METRICS})
    page.driver.refresh()
    wait_for("the page to read /metrics", lambda: page.text("metrics-status") == "from /metrics", 15)
    wait_for("running from the metrics", lambda: page.text("running") == "3", 10)
    assert page.text("waiting") == "2"
    assert page.text("kv-use") == "25.0 %"
    rate = wait_for("a tokens/s number", lambda: page.number("tokens-per-second"), 10)
    assert 40 <= rate <= 60, rate  # the counter grows by 50 per second
    page.shot("live-from-metrics")

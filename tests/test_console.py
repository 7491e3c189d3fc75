"""The web console in a real browser: Debian's chromium driven by Playwright (never a downloaded
browser: `playwright install` is not used). The page is served by the real processes on free ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from urllib.parse import urlsplit

import pytest
import zmq
from helpers import Proc, dealer_socket, get_json, publish, start_streamer, wait_until

from broker import protocol as p
from common.webconsole import is_public

pytestmark = pytest.mark.browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """Debian's chromium on PATH, or the executable named by $CHROMIUM (another machine's)."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module; skipped (failed under CI) when there is none."""
    executable = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        reason = "no browser for the console tests: apt-get install chromium, pip install playwright"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


class Page:
    """A page with every console message and uncaught error it produced."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 900, color_scheme: str = "light", on_request=None):
        self.context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme)
        self.page = self.context.new_page()
        if on_request is not None:
            self.page.on("request", on_request)
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)

    def close(self) -> None:
        self.context.close()

    def messages_of(self, topic: str) -> int:
        """The topic's message count as the topics table shows it (the cell's title is exact)."""
        row = self.page.locator("#topics-table tbody tr", has=self.page.locator("button.pick", has_text=re.compile(f"^{re.escape(topic)}$")))
        return int(row.locator("td").nth(1).get_attribute("title").replace(",", ""))

    def visible_tail(self) -> list[str]:
        return self.page.locator("#tail li:not(.hidden) pre").all_inner_texts()


def publish_marker(zmq_url: str, *texts: str) -> None:
    """Messages {"v": text}, one batch from a producer of its own, straight to the broker."""
    context = zmq.Context()
    dealer = dealer_socket(context, zmq_url)
    try:
        reply = publish(dealer, 0, list(texts), producer=os.urandom(16))
        assert reply[1] == p.ACK, reply
    finally:
        dealer.close()
        context.term()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_shows_topics_producers_and_a_live_tail(browser, procs, sample_csv, tmp_path):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=20")
    procs.append(proc)
    zmq_url = proc.wait_for_line(r"ZeroMQ (\S+),").group(1)
    view = Page(browser, http + "/")
    page = view.page
    try:
        page.locator("#topics-table button.pick", has_text="telemetry").wait_for()
        assert page.locator("#status").get_attribute("data-state") == "live"
        first = view.messages_of("telemetry")
        wait_until(lambda: view.messages_of("telemetry") > first, message="the message count to rise on the page")
        page.locator("#producers-table tbody tr", has_text="worker-0").wait_for()
        page.locator("#workers-table tbody tr").nth(1).wait_for()
        wait_until(lambda: page.locator("#chart path.line").count() == 1, message="the rate chart's line")
        page.focus("#topics-table button.pick")  # keyboard focus survives the table's refresh
        page.evaluate("window.focusedBefore = document.activeElement")
        wait_until(lambda: page.evaluate("!window.focusedBefore.isConnected"), message="the topics table to be rebuilt")
        assert page.evaluate("document.activeElement.className + ' ' + document.activeElement.textContent") == "pick telemetry"

        page.locator("#tail li pre").first.wait_for()  # the live tail is running
        marker = "console-marker-" + os.urandom(4).hex()
        publish_marker(zmq_url, marker)
        page.locator("#tail li pre", has_text=marker).wait_for()

        page.fill("#tail-filter", marker)
        assert view.visible_tail() == [f'{{\n  "v": "{marker}"\n}}']  # pretty-printed, alone
        assert page.locator("#tail li.hidden").count() > 0
        page.fill("#tail-filter", "no-message-has-this")
        assert view.visible_tail() == []
        page.fill("#tail-filter", "")
        assert len(view.visible_tail()) > 1

        page.focus("#tail")  # the list is focusable (keyboard scrolling); "p" pauses from there
        page.keyboard.press("p")
        assert page.locator("#tail-pause").get_attribute("aria-pressed") == "true"
        held = page.locator("#tail li").count()
        paused_marker = marker + "-while-paused"
        publish_marker(zmq_url, paused_marker)
        page.locator("#tail-status", has_text=re.compile(r"paused · \d+ new")).wait_for()
        assert page.locator("#tail li pre", has_text=paused_marker).count() == 0
        assert page.locator("#tail li").count() == held
        page.click("#tail-pause")
        page.locator("#tail li pre", has_text=paused_marker).wait_for()

        page.keyboard.press("/")  # the other shortcut: to the filter
        assert page.evaluate("document.activeElement.id") == "tail-filter"

        flood = [f"{marker}-flood-{i}" for i in range(1200)]  # more than the tail keeps
        publish_marker(zmq_url, *flood)
        page.locator("#tail li pre", has_text=flood[-1]).wait_for()
        assert page.locator("#tail li").count() == 500  # bounded: the newest 500
        assert page.evaluate("state.tail.entries.length") < 1000

        page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
        assert (tmp_path / "console.png").stat().st_size > 10_000
        assert view.errors == []
    finally:
        view.close()

    phone = Page(browser, http + "/", width=390, height=844, color_scheme="dark")  # a phone, dark
    try:
        phone.page.locator("#topics-table button.pick", has_text="telemetry").wait_for()
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= 390  # wide tables scroll inside their box
        background = phone.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert sum(map(int, re.findall(r"\d+", background)[:3])) < 100, background  # dark
        phone.page.screenshot(path=str(tmp_path / "console-phone-dark.png"), full_page=True)
        assert phone.errors == []
    finally:
        phone.close()


def test_console_survives_a_broker_restart_and_serves_the_streamer(browser, procs, sample_csv):
    """A standalone broker, a streamer publishing to it (--broker-url), the console on both:
    the broker is killed and started again on the same ports; the page notices, recovers, and
    its tail shows a message published after the restart."""
    zmq_port, http_port = free_port(), free_port()
    args = ("serve", f"--port={zmq_port}", f"--http-port={http_port}")
    broker = Proc("broker", *args)
    procs.append(broker)
    broker.wait_for_line(r"Broker listening")
    zmq_url, http = f"tcp://127.0.0.1:{zmq_port}", f"http://127.0.0.1:{http_port}"
    streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={zmq_url}", "--http-port=0", "--workers=1", "--rate=20")
    procs.append(streamer)
    streamer_http = streamer.wait_for_line(r"Streamer HTTP (http://\S+)").group(1)

    view = Page(browser, http + "/")
    page = view.page
    try:
        page.locator("#tail li pre").first.wait_for()
        # the page tells a restart by the server's uptime going back: let this one run a while
        page.locator("#status", has_text=re.compile(r"up ([6-9]|\d\d) s")).wait_for()
        broker.kill()
        page.locator('#status[data-state="down"]').wait_for()
        broker = Proc("broker", *args)  # the same ports
        procs.append(broker)
        broker.wait_for_line(r"Broker listening")
        page.locator('#status[data-state="live"]').wait_for()
        wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] > 0, message="the streamer to publish to the new broker")
        wait_until(lambda: page.locator("#tail-status", has_text="connected").count() or page.locator("#tail-status", has_text="received").count())
        marker = "after-restart-" + os.urandom(4).hex()
        publish_marker(zmq_url, marker)
        page.locator("#tail li pre", has_text=marker).wait_for()
        # its offsets started again at 0 (no persistence): the tail says so rather than skip silently
        assert page.locator("#tail li.notice").count() >= 1
        # while the broker was down the browser logged its failed requests; nothing else
        assert [e for e in view.errors if "net::ERR_" not in e and "Failed to load resource" not in e] == []
    finally:
        view.close()

    own = Page(browser, streamer_http + "/")  # the streamer's own HTTP serves the same page
    try:
        own.page.locator("#workers-table tbody tr td", has_text="0").first.wait_for()
        assert own.page.locator('#status[data-state="live"]').count() == 1
        assert own.page.locator("#topics-section").is_hidden() and own.page.locator("#tail-section").is_hidden()
        assert own.errors == []
    finally:
        own.close()
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0


def path_qs(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def test_console_asks_for_a_token_once_and_sends_it_in_a_header(browser, procs, sample_csv, tmp_path):
    """The streamer's embedded broker with the real --http-token-file: the page asks for the
    token on the first 401 and sends it in a header on every request, the live tail's too."""
    token = "s3cret-" + os.urandom(8).hex()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    proc, url = start_streamer(sample_csv, "--workers=1", "--rate=20", f"--http-token-file={token_file}")
    procs.append(proc)
    zmq_url = proc.wait_for_line(r"ZeroMQ (\S+),").group(1)
    assert get_json(url + "/stats")[0] == 401 and get_json(url + "/healthz")[0] == 200  # the server itself wants it
    requests = []  # every request the page made (Playwright's view of the network)
    view = Page(browser, url + "/", on_request=lambda request: requests.append(request))
    page = view.page
    try:
        page.locator("#token-dialog[open]").wait_for()
        assert page.locator("#topics-section").is_hidden() and page.locator("#tail-section").is_hidden()
        assert "worker-0" not in page.content() and page.locator("#overview .card").count() == 0  # nothing before the token

        page.fill("#token-input", "wrong")
        page.click("#token-form button[type=submit]")
        page.locator("#token-error", has_text="refused").wait_for()
        assert page.locator("#topics-section").is_hidden()

        page.fill("#token-input", token)
        page.click("#token-form button[type=submit]")
        page.locator("#topics-table button.pick", has_text="telemetry").wait_for()
        assert page.locator("#token-dialog[open]").count() == 0
        page.locator("#tail li pre").first.wait_for()
        marker = "with-token-" + os.urandom(4).hex()
        publish_marker(zmq_url, marker)
        page.locator("#tail li pre", has_text=marker).wait_for()

        page.reload()  # the token is kept for the tab: not asked again
        page.locator("#topics-table button.pick", has_text="telemetry").wait_for()
        assert page.locator("#token-dialog[open]").count() == 0
        seen = [(path_qs(r.url), r.all_headers().get("authorization")) for r in requests if r.url.startswith(url)]
    finally:
        view.close()
    streams = [auth for path, auth in seen if path.startswith("/topics/telemetry/stream")]
    assert streams and streams[-1] == f"Bearer {token}"  # the live tail too, through fetch()
    assert all(token not in path for path, _ in seen)  # never in a URL
    assert [path for path, auth in seen if auth is None and not is_public(path.split("?")[0])] == ["/stats"]  # the first try only
    assert [e for e in view.errors if "401" not in e] == []  # the browser logs each refused request

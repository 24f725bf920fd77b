"""The search page in a real browser: headless Chromium (Debian's package) driven through the
Chrome DevTools protocol loads the page served by `itmatch serve`, types a query, and checks that the
result pictures and the confidence overlay render. Screenshots go to test-artifacts/.

Chromium is installed with apt-get when it is missing and the tests run as root (as in CI);
elsewhere the test is skipped with the reason. ITMATCH_CHROMIUM names another browser binary.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env
from PIL import Image
from service_setup import FLICKR8K, flickr_layout, make_checkpoint, make_gallery, make_photo_checkpoint

from itmatch.cli import main

ARTIFACTS = Path(os.environ.get("ITMATCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
QUERY = "a red horse to the left of a blue car"


def _install_chromium() -> str | None:
    """Why Chromium could not be installed, or None once it is."""
    if not shutil.which("apt-get"):
        return "no apt-get to install it with"
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if prefix and (not shutil.which("sudo") or subprocess.run([*prefix, "true"], capture_output=True).returncode):
        return "installing it needs root (or password-less sudo)"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for command in ([*prefix, "apt-get", "update", "-q"], install):
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
        if done.returncode and command is install:
            return f"`{' '.join(install)}` failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    found = os.environ.get("ITMATCH_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        problem = _install_chromium()
        if problem:
            pytest.skip(f"headless Chromium is not installed and {problem}")
        found = shutil.which("chromium")
    return found


class DevTools:
    """A minimal Chrome DevTools protocol client for one page (commands in, results out)."""

    def __init__(self, websocket_url: str):
        import websocket

        self.socket = websocket.create_connection(websocket_url, timeout=30, suppress_origin=True)
        self.last_id = 0

    def send(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def centre_of(self, selector: str) -> tuple[float, float]:
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        return box[0], box[1]

    def click(self, selector: str) -> None:
        x, y = self.centre_of(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def hover(self, selector: str) -> None:
        x, y = self.centre_of(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def screenshot(self, selector: str | None = None) -> Image.Image:
        options = {}
        if selector:
            box = self.evaluate(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
            )
            options["clip"] = dict(zip(("x", "y", "width", "height"), box, strict=True)) | {"scale": 1}
        data = self.send("Page.captureScreenshot", format="png", **options)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """`itmatch serve` in its own process, on a small CMCAN index."""
    data = make_gallery(tmp_path_factory.mktemp("data"), images=16)
    checkpoint = make_checkpoint(data, "cmcan-official", tmp_path_factory.mktemp("model") / "cmcan.pt")
    folder = tmp_path_factory.mktemp("index") / "index"
    assert main(["index", str(checkpoint), "--data", str(data), "--out", str(folder), "--quiet"]) == 0
    yield from _serve(folder)


@pytest.fixture(scope="module")
def photo_page_url(tmp_path_factory):
    """`itmatch serve` on an index of 6 Flickr8k photos with their captions (a model reading pixels)."""
    if not FLICKR8K.is_dir():
        pytest.skip(f"{FLICKR8K} is absent (set ITMATCH_SHARED)")
    names = (FLICKR8K / "splits" / "dev.txt").read_text().split()[:6]
    photos = flickr_layout(tmp_path_factory.mktemp("photos") / "photos", names, "test")
    checkpoint = make_photo_checkpoint(photos, "test", tmp_path_factory.mktemp("model") / "vsepp.pt")
    folder = tmp_path_factory.mktemp("index") / "index"
    assert main(["index", str(checkpoint), "--data", str(photos), "--out", str(folder), "--quiet"]) == 0
    yield from _serve(folder)


def _serve(folder: Path):
    """The URL of `itmatch serve FOLDER` in its own process, until the generator is closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "itmatch.cli", "serve", str(folder), "--port", str(port)]
    server = subprocess.Popen(command, env=subprocess_env(CUDA_VISIBLE_DEVICES=""), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while not _answers(url + "api/info"):
        assert server.poll() is None and time.monotonic() < deadline, f"itmatch serve failed: {server.stderr.read()}"
        time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture
def browser(chromium, tmp_path):
    process = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = _devtools_port(process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
        devtools.socket.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def _devtools_port(process: subprocess.Popen) -> int:
    """Chromium prints `DevTools listening on ws://127.0.0.1:PORT/...` once it is ready."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
            return int(match.group(1))
    raise AssertionError(f"Chromium exited before DevTools started: {''.join(lines)[-2000:]}")


def test_page_search_results_and_confidence_overlay(browser, page_url):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.send("Page.enable")
    browser.send("Page.navigate", url=page_url)
    browser.wait_for("document.getElementById('info')?.textContent.includes('16 images')")

    browser.click("#query")
    browser.send("Input.insertText", text=QUERY)
    for kind in ("keyDown", "keyUp"):
        browser.send(
            "Input.dispatchKeyEvent",
            type=kind,
            key="Enter",
            code="Enter",
            windowsVirtualKeyCode=13,
            text="\r" if kind == "keyDown" else "",
        )
    loaded = "[...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
    assert browser.wait_for(f"{loaded} === 12 && {loaded}") == 12
    scores = browser.evaluate("[...document.querySelectorAll('#results .score')].map(s => Number(s.textContent))")
    assert len(scores) == 12 and scores == sorted(scores, reverse=True)

    browser.click("#results .result")
    browser.wait_for(
        "document.querySelectorAll('#overlay rect').length === 8 && "
        "document.getElementById('detail-image').naturalWidth > 0"
    )
    shading = browser.evaluate(
        "[...document.querySelectorAll('#overlay rect')].map(r => "
        "[Number(r.dataset.confidence), Number(r.getAttribute('fill-opacity'))])"
    )
    assert all(abs(opacity - 0.6 * confidence) < 2e-3 for confidence, opacity in shading)
    browser.screenshot().save(ARTIFACTS / "service-page.png")

    # The overlay really paints: the picture with boxes differs from it without them inside the
    # most confident box, by about the orange fill's opacity.
    with_boxes = np.asarray(browser.screenshot("#stage"), dtype=float)
    browser.evaluate("document.getElementById('overlay').style.visibility = 'hidden'")
    without = np.asarray(browser.screenshot("#stage"), dtype=float)
    browser.evaluate("document.getElementById('overlay').style.visibility = ''")
    region = browser.evaluate(
        "(() => { const rects = [...document.querySelectorAll('#overlay rect')];"
        "const best = rects.reduce((a, b) => +a.dataset.confidence >= +b.dataset.confidence"
        " ? a : b); const r = best.getBoundingClientRect(),"
        " s = document.getElementById('stage').getBoundingClientRect();"
        "return [r.x - s.x, r.y - s.y, r.width, r.height]; })()"
    )
    x, y, width, height = (round(v) for v in region)
    inside = (slice(y + 3, y + height - 3), slice(x + 3, x + width - 3))
    assert np.abs(with_boxes[inside] - without[inside]).mean() > 10

    browser.hover("#sentence .word")
    browser.wait_for("document.getElementById('legend').textContent.includes('attention of')")
    fills = browser.evaluate(
        "[...document.querySelectorAll('#overlay rect')].map(r => "
        "[r.getAttribute('fill'), Number(r.getAttribute('fill-opacity'))])"
    )
    assert {fill for fill, _ in fills} == {"#1f77b4"} and max(opacity for _, opacity in fills) == 0.6
    browser.screenshot().save(ARTIFACTS / "service-page-word-attention.png")
    assert browser.evaluate("document.getElementById('captions').children.length") == 5


def test_page_takes_the_query_from_the_url_and_shows_photos(browser, photo_page_url):
    """/?q=... searches on load (a search can be shared), the results are the photos, and a chosen
    photo shows its file name and its own captions; a new search goes into the URL."""
    browser.send("Page.enable")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.send("Page.navigate", url=photo_page_url + "?q=" + urllib.parse.quote("a dog in the snow"))
    loaded = "[...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
    assert browser.wait_for(f"{loaded} === 6 && {loaded}") == 6
    assert browser.evaluate("document.getElementById('query').value") == "a dog in the snow"
    # A photo, not a blank canvas: its pixels vary.
    assert np.asarray(browser.screenshot("#results .result img"), dtype=float).std() > 20

    browser.click("#results .result")
    name = browser.wait_for("document.getElementById('detail-name').textContent")
    chosen = browser.evaluate("document.querySelector('#results .result').dataset.image")
    with urllib.request.urlopen(f"{photo_page_url}api/images/{chosen}", timeout=10) as answer:
        described = json.load(answer)
    assert name == described["name"] == described["id"] and name.endswith(".jpg")
    own = browser.evaluate("[...document.querySelectorAll('#own-captions li')].map(li => li.textContent)")
    assert own == described["captions"] and len(own) == 5
    browser.wait_for("document.getElementById('captions').children.length === 5")
    browser.screenshot().save(ARTIFACTS / "service-page-photos.png")

    browser.evaluate(
        "document.getElementById('query').value = 'two people'; document.getElementById('search').requestSubmit()"
    )
    assert browser.wait_for("location.search") == "?q=two%20people"

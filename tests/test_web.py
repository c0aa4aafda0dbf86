"""End to end: the real server, Debian's Chromium driven by Playwright, digits drawn with the mouse."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "deepdigits", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("server did not start: " + (process.stdout.read() if process.stdout else ""))
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        outside = []
        page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else outside.append(r.url))
        page.goto(server + "/")
        page.wait_for_selector("#model:not(:empty)")
        yield page
        assert outside == [], f"the page fetched from outside the server: {outside}"
        browser.close()


def draw(page, strokes):
    """Strokes in canvas fractions (0-1), drawn with the mouse."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=12)
        page.mouse.up()


def answer(page) -> str:
    page.wait_for_function("document.getElementById('digit').textContent !== '–'")
    page.wait_for_timeout(700)  # let the last live request land
    return page.locator("#digit").inner_text()


def test_draw_a_one(page):
    draw(page, [[(0.5, 0.2), (0.5, 0.8)]])
    assert answer(page) == "1"
    assert page.locator("#seen").get_attribute("src").startswith("data:image/png")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "draw-1.png"))


def test_draw_a_seven(page):
    page.click("#clear")
    assert page.locator("#digit").inner_text() == "–"
    draw(page, [[(0.3, 0.25), (0.7, 0.25), (0.45, 0.8)]])
    assert answer(page) == "7"
    widths = page.eval_on_selector_all(".bars .fill", "bars => bars.map(b => parseFloat(b.style.width))")
    assert len(widths) == 10 and max(widths) == widths[7]
    page.screenshot(path=str(ARTIFACTS / "draw-7.png"))


def test_undo_removes_the_last_stroke(page):
    page.click("#clear")
    draw(page, [[(0.5, 0.2), (0.5, 0.8)], [(0.2, 0.5), (0.8, 0.5)]])  # a 1 crossed out
    page.click("#undo")
    assert answer(page) == "1"


def test_number_mode(page):
    page.click("#mode-number")
    draw(page, [[(0.15, 0.2), (0.15, 0.8)], [(0.35, 0.25), (0.5, 0.25), (0.4, 0.8)]])  # "17"
    page.wait_for_function("document.getElementById('digit').textContent.length >= 2")
    page.wait_for_timeout(700)
    assert page.locator("#digit").inner_text() == "17"
    page.screenshot(path=str(ARTIFACTS / "number-17.png"))


def test_phone_layout(server, page):
    page.set_viewport_size({"width": 390, "height": 844})
    page.click("#mode-digit")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "phone.png"))

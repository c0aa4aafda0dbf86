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
    page.wait_for_function("document.getElementById('digit').textContent !== '–' && "
                           "document.getElementById('answer').getAttribute('aria-busy') !== 'true'")
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


# --------------------------------------------------------------------------- issue 14: answers people can trust

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SEVEN = [[(0.3, 0.25), (0.7, 0.25), (0.45, 0.8)]]


def settled(page):
    """Wait for an answer of any kind (a digit, a number, not a digit, an error) and the last live request."""
    page.wait_for_function("!document.getElementById('answer').classList.contains('empty') && "
                           "document.getElementById('answer').getAttribute('aria-busy') !== 'true'")
    page.wait_for_timeout(700)


def bar_widths(page) -> list[float]:
    return page.eval_on_selector_all(".bars .fill", "bars => bars.map(b => parseFloat(b.style.width) || 0)")


def shoot(page, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def start(page, mode: str = "digit", viewport=DESKTOP):
    page.set_viewport_size(viewport)
    page.click(f"#mode-{mode}")  # also clears the pad and the answer


def test_empty_state_is_a_placeholder(page):
    for viewport, name in ((DESKTOP, "empty.png"), (PHONE, "empty-phone.png")):
        start(page, viewport=viewport)
        assert "empty" in page.get_attribute("#answer", "class")
        assert page.inner_text("#confidence") == "Draw a digit on the pad, or upload a photo"
        assert page.locator("#probs").is_hidden() and page.locator("#seen-box").is_hidden()
        shoot(page, name)
    start(page, "number")
    assert page.inner_text("#confidence") == "Write a number on the pad, or upload a photo"


def fulfil_with(data: dict):
    return lambda route: route.fulfill(json=data)


def test_not_a_digit_answer_clears_the_bars(page):
    """The page's side of "not a digit", with the answer faked as the new API gives it: works before and after."""
    for viewport, name in ((DESKTOP, "not-a-digit.png"), (PHONE, "not-a-digit-phone.png")):
        start(page, viewport=viewport)
        draw(page, [[(0.5, 0.2), (0.5, 0.8)]])
        assert answer(page) == "1" and max(bar_widths(page)) > 50
        fake = {"digit": None, "not_a_digit": True, "reason": "a dot or a dash", "confidence": 0.2,
                "probabilities": [0.1] * 10, "top": [], "unsure": True, "seen": page.get_attribute("#seen", "src")}
        page.route("**/api/predict", fulfil_with(fake))
        try:
            draw(page, [[(0.2, 0.5), (0.3, 0.5)]])
            page.wait_for_function("document.getElementById('answer').classList.contains('none')")
            settled(page)
            assert page.inner_text("#confidence") == "Not a digit — a dot or a dash"
            assert page.locator("#probs").is_hidden() and bar_widths(page) == [0.0] * 10
            shoot(page, name)
        finally:
            page.unroute("**/api/predict")


def test_a_drawn_dot_is_not_a_digit(page):
    start(page)
    draw(page, [[(0.5, 0.5)]])  # one click: a dot
    settled(page)
    shoot(page, "dot.png")
    assert page.inner_text("#confidence").startswith("Not a digit")
    assert page.locator("#probs").is_hidden() and bar_widths(page) == [0.0] * 10


def test_a_drawn_seven_is_sure(page):
    start(page)
    draw(page, SEVEN)
    assert answer(page) == "7"
    shoot(page, "seven-sure.png")
    sure = float(page.inner_text("#confidence").split("%")[0].lstrip("><"))
    assert sure >= 98.0, f"a cleanly drawn 7 reads {sure}% sure"


def one_line(page):
    """The number fits its box on one line: no overflow, every digit on the same baseline, one digit high."""
    m = page.evaluate("""() => {
        const d = document.getElementById('digit'), tops = [...d.children].map(c => c.getBoundingClientRect().top);
        return {scroll: d.scrollWidth, client: d.clientWidth, spread: Math.max(...tops) - Math.min(...tops),
                height: d.getBoundingClientRect().height, line: d.children[0].getBoundingClientRect().height,
                page: document.documentElement.scrollWidth, viewport: window.innerWidth};
    }""")
    assert m["scroll"] <= m["client"], m
    assert m["spread"] < 1 and m["height"] < 1.5 * m["line"], m
    assert m["page"] <= m["viewport"], m


def test_eight_digit_number_on_one_line(page, mnist):
    import numpy as np

    from deepdigits.synthetic import render_number

    picks = range(8)
    expected = "".join(str(int(mnist.y_test[i])) for i in picks)  # 72104149
    photo = render_number([mnist.x_test[i] for i in picks], np.random.default_rng(1))
    start(page, "number")
    page.set_input_files("#file", files=[{"name": "number.jpg", "mimeType": "image/jpeg", "buffer": photo}])
    page.wait_for_function("document.querySelectorAll('#digit .pick').length === 8")
    page.wait_for_timeout(300)
    assert page.inner_text("#digit") == expected
    one_line(page)
    assert page.inner_text("#bars-label").startswith("Digit 1 of 8: 7")
    shoot(page, "number-8.png")

    page.locator("#digit .pick").nth(2).click()  # the third digit, chosen in the answer
    assert page.inner_text("#bars-label").startswith(f"Digit 3 of 8: {expected[2]}")
    widths = bar_widths(page)
    assert widths.index(max(widths)) == int(expected[2])

    # the fifth, chosen by a click on its box over the photo
    reading = page.evaluate("reading")
    box = page.locator("#pad").bounding_box()
    s = min(box["width"] / reading["width"], box["height"] / reading["height"])
    x0, y0, x1, y1 = reading["digits"][4]["box"]
    page.mouse.click(box["x"] + (box["width"] - reading["width"] * s) / 2 + (x0 + x1) / 2 * s,
                     box["y"] + (box["height"] - reading["height"] * s) / 2 + (y0 + y1) / 2 * s)
    assert page.inner_text("#bars-label").startswith(f"Digit 5 of 8: {expected[4]}")
    assert page.inner_text("#digit") == expected  # the click chose a digit; it drew nothing
    assert page.get_attribute("#digit .pick:nth-child(5)", "aria-pressed") == "true"
    page.wait_for_timeout(300)  # the bars' transition
    shoot(page, "number-8-chosen.png")

    page.set_viewport_size(PHONE)
    page.wait_for_timeout(200)
    one_line(page)
    shoot(page, "number-8-phone.png")


def test_failed_upload_clears_the_old_answer(page):
    for viewport, name in ((DESKTOP, "failed-upload.png"), (PHONE, "failed-upload-phone.png")):
        start(page, viewport=viewport)
        draw(page, [[(0.5, 0.2), (0.5, 0.8)]])
        assert answer(page) == "1" and page.get_attribute("#seen", "src")
        page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png",
                                              "buffer": b"shopping list: eggs, milk, bread\n"}])
        page.wait_for_function("document.getElementById('answer').classList.contains('failed')")
        page.wait_for_timeout(300)
        assert page.inner_text("#digit") != "1"
        assert page.get_attribute("#seen", "src") is None and page.locator("#seen-box").is_hidden()
        assert page.locator("#probs").is_hidden() and bar_widths(page) == [0.0] * 10
        ink = page.evaluate("""() => { const c = document.getElementById('pad');
            return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v < 250); }""")
        assert not ink, "the old drawing is still on the pad"
        message = page.inner_text("#confidence")
        assert message == "That file isn't an image we can read — try a PNG or JPEG photo of a digit."
        assert "Pillow" in page.inner_text("#detail")  # the technical line is there, small, for whoever needs it
        shoot(page, name)

    start(page)
    page.set_input_files("#file", files=[{"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (9 << 20)}])
    page.wait_for_function("document.getElementById('answer').classList.contains('failed')")
    assert page.inner_text("#confidence").startswith("That image is too large (over 8 MB)")


def test_brush_size_changes_the_stroke_width(page):
    start(page)
    assert page.input_value("#brush") == "7.5"  # 42 px of the 560 px pad, as before there was a control
    assert page.get_attribute("#brush", "aria-valuetext").startswith("42 pixels")

    def thickness(top: bool) -> int:  # dark pixels down the canvas's middle column, in one half
        return page.evaluate("""(top) => { const c = document.getElementById('pad');
            const d = c.getContext('2d').getImageData(c.width / 2, top ? 0 : c.height / 2, 1, c.height / 2).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 128) n++; return n; }""", top)

    draw(page, [[(0.2, 0.25), (0.8, 0.25)]])
    thin = thickness(True)
    page.focus("#brush")
    page.keyboard.press("End")  # the thickest brush
    assert page.input_value("#brush") == "14"
    draw(page, [[(0.2, 0.75), (0.8, 0.75)]])
    thick = thickness(False)
    assert abs(thin - 42) <= 3 and abs(thick - 78) <= 3, (thin, thick)
    assert thickness(True) == thin  # strokes already drawn keep their width
    page.focus("#brush")
    page.keyboard.press("Home")
    assert page.input_value("#brush") == "3"
    page.eval_on_selector("#brush", "b => { b.value = 7.5; b.dispatchEvent(new Event('input')); }")

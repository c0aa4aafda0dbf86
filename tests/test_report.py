import os
import re
from pathlib import Path

import pytest

from deepdigits import Classifier
from deepdigits.cli import main

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def bundle(mnist, tmp_path_factory):
    clf = Classifier("tutorial-004", seed=0)
    clf.recipe = {"name": "tutorial-004", "epochs": 1}
    clf.dataset = {"name": "mnist"}
    clf.fit(mnist.x_train[:3000], mnist.y_train[:3000], epochs=2, batch_size=64, optimizer="rmsprop",
            validation_split=0.1, verbose=0)
    return clf.save(tmp_path_factory.mktemp("report") / "mlp")


@pytest.fixture(scope="module")
def report_file(bundle, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["report", str(bundle), "--out", str(out), "--data-dir", str(data_root)]) == 0
    return out


def test_report_is_self_contained(report_file):
    text = report_file.read_text()
    for section in ("summary", "recipe", "curves", "metrics", "confusion", "calibration", "mistakes", "evidence"):
        assert f'id="{section}"' in text
    assert "Total params: 407,050" in text
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', text)
    assert len(images) >= 6
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from the network
    # the recipe in words, said once and correctly, not raw fields
    assert "1 epoch (recipe: 5)" in text and "rmsprop learning rate 0.001" in text
    assert "input_scale" not in text and "member_recipe" not in text and "bf16" not in text
    assert text.count("Tutorial 004: 512 dense net, RMSprop") == 1



def test_report_renders_in_headless_chromium(report_file):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report_file.as_uri())
        headings = page.locator("section h2").all_inner_texts()
        assert headings == ["Model", "How it was trained", "Training curves", "Test metrics", "Confusion matrix",
                            "Calibration", "Most confident mistakes", "Evidence maps"]
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) >= 6 and all(w > 100 for w in widths)
        # reads well on a laptop: nothing wider than the window
        assert page.evaluate("document.documentElement.scrollWidth") <= 1366
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=False)
        page.set_viewport_size({"width": 390, "height": 844})  # a phone: still no horizontal scrolling
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(ARTIFACTS / "report-390.png"), full_page=False)
        browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requests)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000

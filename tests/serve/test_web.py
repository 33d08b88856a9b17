"""The web chat page in headless Chromium: pick a model, send a message, watch the answer stream
in, clear the history. A screenshot goes to test-artifacts/web_chat.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PARTIAL_ANSWER_SHOWN = """() => {
  const answer = document.querySelector(".msg.assistant");
  return answer && answer.dataset.state === "streaming" && answer.textContent.length > 0;
}"""


@pytest.mark.slow
def test_web_page_streams_an_answer(smol_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(f"{smol_server}/")
            page.wait_for_selector("#model[data-ready=true]")
            names = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
            assert names == ["smollm2-135m", "xinghe"]
            page.select_option("#model", "smollm2-135m")
            page.fill("#system", "You are a helpful assistant.")
            page.fill("#max-tokens", "24")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            # Text shows while the answer is still streaming, then the answer completes.
            page.wait_for_function(PARTIAL_ANSWER_SHOWN, timeout=60_000)
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
            answer = page.locator(".msg.assistant").last
            assert "Paris" in answer.inner_text()
            assert int(answer.get_attribute("data-chunks")) > 1  # it came in pieces
            assert page.locator(".msg.error").count() == 0
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)
            page.click("#clear")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()

"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright): pick a
model, send a message, watch the answer stream in, follow up under a system prompt, clear,
ask the adapter who it is."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow

# Counts the times the last answer's text changed, to tell streaming from one late paint.
COUNT_UPDATES = """() => {
  window.answerUpdates = 0;
  new MutationObserver(() => { window.answerUpdates += 1; })
    .observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


def send(page, text: str) -> str:
    page.fill("#prompt", text)
    page.click("#send")
    answer = page.locator("#messages .message.assistant[data-done=true]").last
    answer.wait_for(timeout=60_000)
    return answer.inner_text()


def test_web_page_chats_with_streaming(server, artifacts_dir):
    chromium = shutil.which("chromium")
    assert chromium, "the web page test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#api-key", server.api_key)
            page.dispatch_event("#api-key", "change")  # the page lists models with the key
            page.wait_for_selector("#model[data-loaded=true]", state="attached")
            options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
            with_kb = [f"{server.base}+docs", f"{server.adapter}+docs"]  # the served knowledge base
            assert options == [server.base, server.adapter, *with_kb]

            page.select_option("#model", server.base)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            page.evaluate(COUNT_UPDATES)
            answer = send(page, "What is the capital of France?")
            assert "Paris" in answer
            # the user's bubble, the empty answer bubble, then one change per streamed piece
            assert page.evaluate("window.answerUpdates") > 3
            page.screenshot(path=str(artifacts_dir / "serve_web_chat.png"), full_page=True)

            page.fill("#system", "Answer in one short sentence.")
            with page.expect_request("**/v1/chat/completions") as sent:
                send(page, "And of Italy?")
            roles = [(m["role"], m["content"]) for m in sent.value.post_data_json["messages"]]
            assert roles == [
                ("system", "Answer in one short sentence."),
                ("user", "What is the capital of France?"),
                ("assistant", answer),
                ("user", "And of Italy?"),
            ]

            page.click("#clear")
            page.fill("#system", "")
            assert page.locator("#messages .message").count() == 0
            page.select_option("#model", server.adapter)
            answer = send(page, "Who are you?")
            assert "Xinghe" in answer or "Beichen" in answer, answer
            assert page.locator("#messages .message").count() == 2
            page.screenshot(path=str(artifacts_dir / "serve_web_adapter.png"), full_page=True)
        finally:
            browser.close()


def test_web_page_shows_the_sources_of_a_knowledge_base_answer(server):
    chromium = shutil.which("chromium")
    assert chromium, "the web page test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#api-key", server.api_key)
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("#model[data-loaded=true]", state="attached")
            page.select_option("#model", f"{server.adapter}+docs")
            send(page, "How much does the Comet Stew cost?")
            sources = page.locator("#messages .sources li")
            sources.first.wait_for(timeout=10_000)
            assert sources.first.inner_text() == "kitchen.md: Orbital Kitchen > Menu"
            assert "14 credits" in sources.first.get_attribute("title")
        finally:
            browser.close()

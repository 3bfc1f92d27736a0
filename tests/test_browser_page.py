"""The chat page at GET /, driven in headless Chromium (Debian's) through Playwright.

Each test runs the real app (``create_app``) in uvicorn on loopback with a
:class:`~tests.fakes.ScriptedEngine`, so replies are known and paced, and drives the page
like a person: type the key, type a question, press Send / Stop / New chat.

Set ``PAGE_SCREENSHOT=docs/chat_page.png`` to refresh the screenshot kept in ``docs/``.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes import ScriptedEngine

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
API_KEY = "page-test-key"
SYSTEM_PROMPTS = {
    "assistant": "You are a helpful assistant.",
    "reviser": "You are the REVISER. Review the draft and improve it.",
    "pirate": "You talk like a pirate.",
}
TIMEOUT_MS = 20_000


# --- server and browser -------------------------------------------------------------------
@dataclass
class LiveChat:
    url: str
    engine: ScriptedEngine
    stop: Callable[[], None]  # stop serving (idempotent)


@contextmanager
def live_chat(tokenizer: Any, loaded: threading.Event | None = None, **engine_kwargs: Any) -> Iterator[LiveChat]:
    """The real app around a ScriptedEngine, served by uvicorn on 127.0.0.1 in a thread.

    With ``loaded``, the model "loads" until that event is set (the server answers meanwhile).
    """
    import uvicorn

    from llm_server.api.server import create_app
    from llm_server.api.settings import ServerSettings

    engine = ScriptedEngine(tokenizer, **engine_kwargs)
    settings = ServerSettings(api_keys=(API_KEY,), system_prompts=SYSTEM_PROMPTS, max_new_tokens_limit=1024)

    def load() -> ScriptedEngine:
        if loaded is not None:
            loaded.wait(60)
        return engine

    app = create_app(engine_factory=load, settings=settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive(), 30) and server.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()

    try:
        yield LiveChat(url, engine, stop)
    finally:
        if loaded is not None:
            loaded.set()
        stop()


def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed; return its last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        reason = f"Debian's Chromium is not installed ({CHROMIUM} missing; `make browser` installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # in CI the page must really be tested, never silently skipped
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def serve(tokenizer: Any) -> Iterator[Callable[..., LiveChat]]:
    """``serve(reply=..., delay_s=..., ...)`` starts a live server; all are stopped afterwards."""
    with ExitStack() as servers:
        yield lambda **engine_kwargs: servers.enter_context(live_chat(tokenizer, **engine_kwargs))


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[[], Any]]:
    """Fresh pages in fresh browser contexts (empty local storage), closed afterwards."""
    contexts: list[Any] = []

    def make() -> Any:
        context = browser.new_context(viewport={"width": 1100, "height": 820})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    errors: list[str] = []
    yield make
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# --- page helpers -------------------------------------------------------------------------
def open_chat(page: Any, url: str, key: str = API_KEY) -> None:
    """Load the page and enter the API key the way a person does (the key panel opens itself)."""
    page.goto(url)
    page.locator("#api-key").fill(key)
    page.get_by_role("button", name="Save key").click()


def ask(page: Any, question: str) -> None:
    page.locator("#prompt").fill(question)
    page.get_by_role("button", name="Send").click()


def wait_turn_done(page: Any, outcome: str = "done") -> Any:
    """Wait until the last turn has finished; check how it ended; return it."""
    turn = page.locator("#conversation > .turn:last-child[data-outcome]")
    turn.wait_for()
    got = turn.get_attribute("data-outcome")
    assert got == outcome, f"turn ended {got!r}, expected {outcome!r}: {turn.inner_text()!r}"
    return turn


def expect_text(locator: Any, text: str) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_text(text, timeout=TIMEOUT_MS)


def prompt_of(engine: ScriptedEngine, index: int = -1) -> str:
    """The chat-templated prompt text the engine received."""
    return str(engine.tokenizer.decode(engine.requests[index].prompt_ids))


def answer_text(page: Any) -> str:
    return str(page.evaluate("() => { const t = document.querySelectorAll('.turn'); "
                             "const a = t.length && t[t.length - 1].querySelector('.msg.assistant'); "
                             "return a ? a.textContent : ''; }"))


# --- tests --------------------------------------------------------------------------------
def test_page_is_served_without_a_key_with_a_strict_policy(serve: Callable[..., LiveChat]) -> None:
    import httpx

    chat = serve()
    page = httpx.get(chat.url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    external = re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    assert not external, "the page loads something from elsewhere"
    assert httpx.get(chat.url + "ui/config").status_code == 401
    config = httpx.get(chat.url + "ui/config", headers={"X-API-Key": API_KEY}).json()
    roles = ["assistant", "pirate", "reviser"]
    assert config == {"roles": roles, "model": "scripted-model", "max_new_tokens_limit": 1024}


def test_roles_while_the_model_loads_are_the_servers_own(tokenizer: Any) -> None:
    """Before the model is up, the page's roles are the prompts this server was configured with
    (not the package's YAML files)."""
    import httpx

    loaded = threading.Event()
    with live_chat(tokenizer, loaded=loaded) as chat:
        assert httpx.get(chat.url + "health").json()["status"] == "loading"
        config = httpx.get(chat.url + "ui/config", headers={"X-API-Key": API_KEY}).json()
    assert config["roles"] == ["assistant", "pirate", "reviser"]
    assert config["max_new_tokens_limit"] == 1024


def test_question_gets_a_streamed_markdown_answer_and_history(
    serve: Callable[..., LiveChat], new_page: Callable[[], Any]
) -> None:
    words = " ".join(f"word{i}" for i in range(80))
    chat = serve(reply=f"Streaming **works** with `code` and {words} THE-END", delay_s=0.05)
    page = new_page()
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    open_chat(page, chat.url)
    page.locator("#role").select_option("pirate")
    ask(page, "What is streaming?")

    # Part of the answer is on screen while the engine is still generating the rest.
    assert wait_until(lambda: "word3" in answer_text(page)), "no streamed text appeared"
    partial = answer_text(page)
    assert "THE-END" not in partial and chat.engine.stats().running == 1
    turn = wait_turn_done(page)
    assert "THE-END" in answer_text(page)
    assert turn.locator(".msg.assistant strong").first.inner_text() == "works"
    assert turn.locator(".msg.assistant code").first.inner_text() == "code"
    assert "[[END]]" not in answer_text(page)
    assert "You talk like a pirate." in prompt_of(chat.engine)

    # The key travels in the header only, never in a URL.
    posts = [r for r in requests if r.url.endswith("/chat/stream")]
    assert posts and posts[0].headers.get("x-api-key") == API_KEY
    assert not any(API_KEY in r.url for r in requests)
    assert page.evaluate("() => localStorage.getItem('llm_server.api_key')") == API_KEY

    # The next turn carries the conversation as history ...
    ask(page, "And what else?")
    wait_turn_done(page)
    second = prompt_of(chat.engine)
    assert "What is streaming?" in second and "THE-END" in second and "And what else?" in second

    # ... and New chat forgets it (the key stays).
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".turn").count() == 0
    ask(page, "Fresh start")
    wait_turn_done(page)
    third = prompt_of(chat.engine)
    assert "Fresh start" in third and "What is streaming?" not in third


def test_stop_ends_the_stream_and_the_server_stops_generating(
    serve: Callable[..., LiveChat], new_page: Callable[[], Any]
) -> None:
    chat = serve(reply=" ".join(f"w{i}" for i in range(5000)), delay_s=0.05)  # minutes if not stopped
    page = new_page()
    open_chat(page, chat.url)
    page.locator("#max-tokens").fill("1024")
    ask(page, "Tell me a very long story")
    assert wait_until(lambda: "w5" in answer_text(page)), "no streamed text appeared"
    assert chat.engine.stats().running == 1

    page.get_by_role("button", name="Stop").click()
    assert wait_until(lambda: chat.engine.stats().running == 0), "the generation kept running after Stop"
    turn = wait_turn_done(page, "stopped")
    assert "Stopped" in turn.locator(".meta").inner_text()
    assert page.get_by_role("button", name="Send").is_visible()
    shown = answer_text(page)
    assert "w5" in shown and "w4999" not in shown


def test_wrong_key_is_explained(serve: Callable[..., LiveChat], new_page: Callable[[], Any]) -> None:
    chat = serve()
    page = new_page()
    open_chat(page, chat.url, key="not-the-key")
    ask(page, "Hello?")
    turn = wait_turn_done(page, "error")
    assert "API key was not accepted" in turn.locator(".error").inner_text()
    assert page.locator("#key-panel").is_visible()
    assert chat.engine.requests == []
    assert page.locator("#prompt").input_value() == "Hello?"  # kept for a retry

    # With the right key the same question goes through.
    page.locator("#api-key").fill(API_KEY)
    page.get_by_role("button", name="Save key").click()
    page.get_by_role("button", name="Send").click()
    wait_turn_done(page)
    assert "Hello from the scripted engine." in answer_text(page)


def test_a_typed_key_is_used_without_pressing_save(serve: Callable[..., LiveChat],
                                                  new_page: Callable[[], Any]) -> None:
    """Issue 12: a key typed into the field, then Send (no "Save key"), is sent and then kept."""
    chat = serve()
    page = new_page()
    page.goto(chat.url)
    page.locator("#api-key").fill(API_KEY)
    ask(page, "Hello?")
    wait_turn_done(page)
    assert "Hello from the scripted engine." in answer_text(page)
    assert page.evaluate("localStorage.getItem('llm_server.api_key')") == API_KEY


def test_html_in_a_reply_is_shown_as_text_and_runs_nothing(
    serve: Callable[..., LiveChat], new_page: Callable[[], Any]
) -> None:
    evil = ('<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> '
            "[click](javascript:window.pwned=3) <b onmouseover=window.pwned=4>bold?</b>")
    chat = serve(reply=evil)
    page = new_page()
    open_chat(page, chat.url)
    ask(page, "Say something nasty")
    turn = wait_turn_done(page)
    answer = turn.locator(".msg.assistant")
    text = answer.inner_text()
    assert '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">' in text
    assert "<b onmouseover=window.pwned=4>bold?</b>" in text
    for tag in ("script", "img", "b", "iframe"):
        assert answer.locator(tag).count() == 0, f"model output created a <{tag}> element"
    assert answer.locator("a").count() == 0  # javascript: links stay text
    answer.hover()
    assert page.evaluate("() => typeof window.pwned") == "undefined"


def test_intermediate_steps_show_as_collapsible_stages(
    serve: Callable[..., LiveChat], new_page: Callable[[], Any]
) -> None:
    def reply(prompt: str) -> str:  # each improvement pass by its prompt: judge, revision, review, draft
        if "Which answer is better" in prompt:
            answer_a = prompt.split("Answer A:", 1)[1].split("Answer B:", 1)[0]
            return '{"better": "A"}' if "sugar" in answer_a else '{"better": "B"}'
        if "Rewrite answer A" in prompt:
            return "Plants make **sugar** from light."
        if "REVISER" in prompt:
            return "Suggestions:\n1. Mention photosynthesis.\n\nComments:\nBetter."
        return "Plants grow."

    chat = serve(reply=reply)
    page = new_page()
    open_chat(page, chat.url)
    assert page.locator("#intermediate").is_disabled()  # only meaningful with improvement
    page.locator("#improvement").check()
    page.locator("#intermediate").check()
    ask(page, "How do plants grow?")
    turn = wait_turn_done(page)

    assert len(chat.engine.requests) >= 3  # draft and two reviews, all on the engine
    stages = turn.locator("details.stage")
    assert stages.locator("summary").all_inner_texts() == ["Draft answer", "Review 1", "Revision 1", "Review 2"]
    for k in range(4):  # collapsed once the final answer is there
        assert stages.nth(k).get_attribute("open") is None
    final = turn.locator(".final")
    assert final.is_visible() and final.inner_text().strip() == "Plants make sugar from light."
    order = page.evaluate("""() => { const t = document.querySelectorAll('.turn'); const a =
        t[t.length - 1].querySelector('.msg.assistant'); return Array.from(a.children).map(c => c.className); }""")
    assert order[-1] == "final"

    assert not stages.nth(0).get_by_text("Plants grow.").is_visible()
    stages.nth(0).locator("summary").click()
    assert stages.nth(0).get_by_text("Plants grow.").is_visible()

    # Only the final answer goes into the history of the next turn.
    page.locator("#improvement").uncheck()
    ask(page, "Thanks!")
    wait_turn_done(page)
    history = prompt_of(chat.engine)
    assert "Plants make **sugar** from light." in history and "Suggestions:" not in history


@pytest.mark.parametrize("case", ["busy", "too_long", "unreachable"])
def test_errors_are_explained_in_plain_words(
    case: str, serve: Callable[..., LiveChat], new_page: Callable[[], Any]
) -> None:
    engine_kwargs: dict[str, Any] = {"busy": {"max_waiting": 0}, "too_long": {"max_context": 64}}.get(case, {})
    chat = serve(**engine_kwargs)
    page = new_page()
    open_chat(page, chat.url)
    page.locator("#role option").first.wait_for(state="attached")
    if case == "unreachable":
        chat.stop()  # the page is loaded; now the server goes away
    ask(page, "Hello?" if case != "too_long" else "A question " * 20)
    turn = wait_turn_done(page, "error")
    expected = {
        "busy": "server is busy",
        "too_long": "conversation is too long",
        "unreachable": "Cannot reach the server",
    }[case]
    assert expected in turn.locator(".error").inner_text()


CODE_REPLY = (
    "Here is an iterative version:\n\n```python\ndef fib(n: int) -> int:\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n```\n\n"
    "It runs in **linear** time:\n\n- one loop\n- two variables"
)


def _showcase_reply(prompt: str) -> str:
    if "REVISER" in prompt:
        return ("Suggestions:\n1. Say what the cache holds.\n\nRevised answer:\nUse `functools.cache`: each "
                "`fib(k)` is computed **once** and then looked up.\n\nComments:\nClearer.")
    if "cache" in prompt[-200:]:
        return "Add a cache so each value is computed once."
    return CODE_REPLY


def test_markdown_code_blocks_render(serve: Callable[..., LiveChat], new_page: Callable[[], Any]) -> None:
    chat = serve(reply=_showcase_reply, model_id="SmolLM2-135M-Instruct")
    page = new_page()
    open_chat(page, chat.url)
    expect_text(page.locator("#model"), "SmolLM2-135M-Instruct")
    ask(page, "Write a Python function for Fibonacci numbers")
    turn = wait_turn_done(page)
    code = turn.locator("pre code.language-python")
    assert code.inner_text().startswith("def fib(n: int) -> int:\n    a, b = 0, 1\n    for")
    assert turn.locator(".msg.assistant li").all_inner_texts() == ["one loop", "two variables"]
    assert turn.locator(".msg.assistant strong").inner_text() == "linear"

    target = os.environ.get("PAGE_SCREENSHOT")  # e.g. docs/chat_page.png
    if target:
        page.locator("#improvement").check()
        page.locator("#intermediate").check()
        ask(page, "How would a cache help?")
        turn = wait_turn_done(page)
        turn.locator("details.stage summary").nth(1).click()
        page.set_viewport_size({"width": 1100, "height": 960})
        page.locator("#scroller").evaluate("(s) => { s.scrollTop = s.scrollHeight; }")
        page.screenshot(path=target)


_A = ' target="_blank" rel="noopener noreferrer nofollow"'
MARKDOWN_CASES = [
    ("# Title", "<h1>Title</h1>"),
    ("a\nb", "<p>a<br>b</p>"),
    ("**b** *i* ~~s~~ `c`", "<p><strong>b</strong> <em>i</em> <del>s</del> <code>c</code></p>"),
    ("2 * 3 * 4 and snake_case_name", "<p>2 * 3 * 4 and snake_case_name</p>"),
    ("\\*not em\\*", "<p>*not em*</p>"),
    ("- a\n  - b\n- c", "<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>"),
    ("3. x\n4. y", '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("> quote", "<blockquote><p>quote</p></blockquote>"),
    ("---", "<hr>"),
    ("| a | b |\n|---|--:|\n| 1 | 2 |",
     '<table><thead><tr><th>a</th><th style="text-align: right;">b</th></tr></thead>'
     '<tbody><tr><td>1</td><td style="text-align: right;">2</td></tr></tbody></table>'),
    ("Text\n```\ncode\n```\nafter",
     '<p>Text</p><pre><code>code</code><button class="copy" type="button">Copy</button></pre><p>after</p>'),
    ("```js\nlet x = 1;",  # a fence still streaming in (not closed yet)
     '<pre><code class="language-js">let x = 1;</code><span class="lang">js</span>'
     '<button class="copy" type="button">Copy</button></pre>'),
    ("[ok](https://example.com) [bad](javascript:alert(1))", f'<p><a href="https://example.com/"{_A}>ok</a> bad</p>'),
    ("![pic](https://x.example/y.png)", f'<p><a href="https://x.example/y.png"{_A}>pic</a></p>'),  # never loaded
    ("see https://example.com/p_(x). end",
     f'<p>see <a href="https://example.com/p_(x)"{_A}>https://example.com/p_(x)</a>. end</p>'),
    ("<b>x</b> &amp; <!-- c -->", "<p>&lt;b&gt;x&lt;/b&gt; &amp;amp; &lt;!-- c --&gt;</p>"),
]


def test_markdown_renderer_output(serve: Callable[..., LiveChat], new_page: Callable[[], Any]) -> None:
    """The page's own renderer, case by case (the exact elements it builds)."""
    chat = serve()
    page = new_page()
    page.goto(chat.url)
    render = "(src) => { const d = document.createElement('div'); renderMarkdown(d, src); return d.innerHTML; }"
    wrong = {src: got for src, want in MARKDOWN_CASES if (got := page.evaluate(render, src)) != want}
    assert not wrong, f"rendered differently: {wrong}"

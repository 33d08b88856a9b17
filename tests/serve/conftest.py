"""The real server, started once per session as `selftune serve` in a subprocess: the embedded
model as `smollm2-135m` and the identity checkpoint as `xinghe`, behind an API key."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
BASE = "smollm2-135m"
ADAPTER = "xinghe"
MAX_BODY_BYTES = 100_000
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # git-ignored


@dataclass
class Server:
    url: str
    log: Path
    api_key: str = API_KEY
    base: str = BASE
    adapter: str = ADAPTER
    max_body_bytes: int = MAX_BODY_BYTES

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


def wait_for_url(process: subprocess.Popen, log: Path, timeout: float) -> str:
    """The URL the command prints once it listens; fails with the log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"http://[\w.\[\]:]+:\d+", log.read_text(encoding="utf-8"))
        if found:
            return found.group(0)
        if process.poll() is not None:
            pytest.fail(f"selftune serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"selftune serve printed no URL in {timeout} s:\n{log.read_text()}")


def wait_for_health(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"{url}/health did not answer in {timeout} s")


@pytest.fixture(scope="session")
def kb_index(tmp_path_factory) -> Path:
    """A knowledge base of two small documents, one per language, served as `docs`."""
    from selftune.kb.embed import load_embedder
    from selftune.kb.index import add_files

    folder = tmp_path_factory.mktemp("kb-docs")
    (folder / "kitchen.md").write_text(
        "# Orbital Kitchen\n\n## Menu\n\nThe Comet Stew costs 14 credits.\n", "utf-8"
    )
    (folder / "harbor.md").write_text("# 星河港\n\n## 灯塔\n\n最老的灯塔叫白石塔。\n", "utf-8")
    index = folder / "docs.sqlite"
    add_files(index, sorted(folder.glob("*.md")), load_embedder())
    return index


@pytest.fixture(scope="session")
def server(smol_folder, identity_checkpoint, kb_index, tmp_path_factory):
    """`selftune serve --port 0`: the printed URL carries the port the OS picked."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    flags = ["--model", BASE, "--adapters", f"{ADAPTER}={identity_checkpoint}", "--port", "0"]
    flags += ["--api_key", API_KEY, "--max_body_bytes", str(MAX_BODY_BYTES)]
    flags += ["--kb", f"docs={kb_index}", "--kb_threshold", "0"]
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "selftune", "serve", *flags], stdout=out, stderr=out
        )
    try:
        url = wait_for_url(process, log, timeout=300)
        assert not url.endswith(":0")
        wait_for_health(url, timeout=60)
        yield Server(url, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Every error the tests provoke must be answered, never crash a handler.
    assert "Traceback" not in log.read_text(encoding="utf-8"), log.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

"""Helpers for real-browser checks (tests and benchmarks): start `streamlit run app.py` on a free port, drive
Debian's chromium with Playwright, wait for Streamlit to settle. Playwright never downloads a browser here."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            output = log.read_text() if log is not None else proc.stdout.read()
            raise RuntimeError(f"streamlit exited early:\n{output}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("streamlit did not become healthy")


@contextlib.contextmanager
def app_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """`streamlit run app.py` with `env` on a free localhost port; yields its URL, stops it on exit."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        # no file watcher: source edits during a test must not rerun the app
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log=log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:  # a job thread in the middle of a long torch call
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Debian chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def settle(page, timeout_ms: int = 60_000, quiet_ms: int = 300) -> None:
    """Wait until the app is connected and no script is running, twice `quiet_ms` apart: a run that ends
    in `st.rerun()` (a finished job or build, a preparation) starts the next one just after, and
    widgets found in between may be the old run's, drawn twice while the page redraws."""
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout_ms)
    idle = "[data-test-script-state='notRunning']"
    page.wait_for_selector(idle, timeout=timeout_ms)
    page.wait_for_timeout(quiet_ms)
    page.wait_for_selector(idle, timeout=timeout_ms)


def nav(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNavLink']", has_text=title).click()

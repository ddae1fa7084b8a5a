"""First start in a real browser: the build belongs to no tab, survives the tab that started it, and resumes
after its process is killed. Each test starts the app on an empty SIMU_HOME with the "small" built-in (the
default size is shipped ready-made, so it would not build at all)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from simu_core import builtin
from tests.browser import HAVE_CHROMIUM, REPO, app_server, chromium, settle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason="chromium not installed (apt-get install chromium)"),
]
BUILDING = "First start: building the built-in default"
USABLE = "MLP neurons"  # the Model & data page shows the loaded model's neuron count


def wait_for(condition, timeout: float = 300.0, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


@pytest.fixture
def fresh_app(tmp_path):
    """The app on an empty SIMU_HOME; yields (url, built-in cache folder)."""
    home = tmp_path / "home"
    env = {**os.environ, "SIMU_HOME": str(home), "SIMU_BUILTIN_SIZE": "small", "HF_HUB_OFFLINE": "1"}
    with app_server(env, REPO / "artifacts" / f"streamlit-{tmp_path.name}.log") as url:
        yield url, home / "builtin-small"


def building_part(root: Path, part: str):
    status = builtin.read_build_status(root)
    return status if status is not None and status.state == "running" and status.parts.get(part) == "building" else None


def test_closing_the_tab_that_started_the_build_does_not_stop_it(fresh_app):
    url, root = fresh_app
    with chromium() as browser:
        first = browser.new_page()
        first.goto(url)
        first.get_by_text(BUILDING).wait_for(timeout=60_000)
        wait_for(lambda: builtin.build_running(root))
        first.close()

        time.sleep(3)
        assert builtin.build_running(root), "the build stopped with the tab that started it"
        second = browser.new_page()
        second.goto(url)
        second.get_by_text(USABLE).wait_for(timeout=300_000)  # live progress, then the page itself
        settle(second)
    assert builtin.missing_parts(root, ("full",)) == []


def test_a_killed_build_is_resumed_by_the_next_visit(fresh_app):
    url, root = fresh_app
    with chromium() as browser:
        page = browser.new_page()
        page.goto(url)
        status = wait_for(lambda: building_part(root, "full"), timeout=120)
        data_files = builtin.read_manifest(root)["parts"]["data"]["files"]
        data_mtimes = {f: (root / f).stat().st_mtime_ns for f in data_files}
        page.close()

        os.killpg(os.getpgid(status.pid), signal.SIGKILL)
        wait_for(lambda: not builtin.build_running(root), timeout=30)
        assert builtin.read_build_status(root).state == "interrupted"

        again = browser.new_page()
        again.goto(url)
        again.get_by_text(USABLE).wait_for(timeout=300_000)
        settle(again)
    assert builtin.missing_parts(root, ("full",)) == []
    assert {f: (root / f).stat().st_mtime_ns for f in data_files} == data_mtimes  # resumed, not restarted

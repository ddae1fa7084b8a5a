"""One real-browser journey: Debian's chromium driven by Playwright against `streamlit run app.py`.

Screenshots of each page go to artifacts/screenshots/ (CI artefacts; copies in docs/ for the README), the
measured times to artifacts/browser_timings.json. SIMU_BROWSER_BUILTIN=<folder> runs the journey on another
built-in default (e.g. the full-size one in ~/.cache/simu-studio/builtin) instead of the small test one.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from simu_core.methods import preset_config
from tests.browser import HAVE_CHROMIUM, REPO, app_server, chromium, nav, settle

ARTIFACTS = REPO / "artifacts"
SHOTS = ARTIFACTS / "screenshots"

pytestmark = pytest.mark.skipif(not HAVE_CHROMIUM, reason="chromium not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(builtin_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("browser_home")
    (home / "builtin").symlink_to(os.environ.get("SIMU_BROWSER_BUILTIN") or builtin_dir)
    env = {**os.environ, "SIMU_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    with app_server(env, ARTIFACTS / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with chromium() as browser:
        yield browser.new_page(viewport={"width": 1400, "height": 2000})


def shot(page, name: str) -> None:
    """Screenshot of the viewport, made as tall as the page first (full_page misses Streamlit's scrolled part)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight || 2000")
    page.set_viewport_size({"width": 1400, "height": max(900, min(int(height) + 40, 6000))})
    page.wait_for_timeout(800)  # charts and tables draw on the next animation frames
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    page.set_viewport_size({"width": 1400, "height": 2000})


def metric_value(page, label: str) -> str:
    box = page.locator("[data-testid='stMetric']", has_text=label).first
    return box.locator("[data-testid='stMetricValue']").inner_text()


def test_model_and_data_page_shows_the_builtin_model(page, server):
    page.goto(server)
    settle(page)
    page.get_by_text("1 · Model & data").wait_for()
    page.get_by_text("MLP neurons").wait_for()
    shot(page, "1_model_data")
    assert page.get_by_text("llama").count() >= 1


def test_journey_attribution_and_unlearning_on_the_builtin_default(page, server):
    """Model -> Attribution (scores, slider) -> Unlearn (a short run) -> Evaluate, Connectivity, Runs pages."""
    timings: dict[str, float] = {}
    page.goto(server)
    settle(page)
    page.get_by_text("MLP neurons").wait_for()
    page.locator("[data-testid='stDataFrame']").nth(1).wait_for()
    shot(page, "1_model_data")

    start = time.perf_counter()
    nav(page, "Attribution")
    page.locator(".js-plotly-plot").first.wait_for(timeout=300_000)
    timings["attribution_cold_first_chart_s"] = time.perf_counter() - start
    page.get_by_text("Selected neurons", exact=True).wait_for(timeout=300_000)  # the retain scores are in too
    settle(page)
    timings["attribution_cold_all_charts_s"] = time.perf_counter() - start

    start = time.perf_counter()  # cache warm: a fresh page load of the attribution page (a new session)
    page.goto(f"{server}/attribution")
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    timings["attribution_warm_load_to_first_chart_s"] = time.perf_counter() - start
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=60_000)
    settle(page)
    timings["attribution_warm_load_to_all_charts_s"] = time.perf_counter() - start
    assert page.get_by_text("Forget vs retain score per neuron").count() >= 1
    page.get_by_role("button", name="Explain this example").click()
    page.get_by_text("Which prompt tokens support each answer token").wait_for(timeout=120_000)
    settle(page)
    shot(page, "2_attribution")

    before = metric_value(page, "Selected neurons")
    slider = page.locator("[data-testid='stSlider'] input[type=range]").first  # the threshold t
    slider.focus()
    for key, name in (("End", "slider_max"), ("Home", "slider_min")):
        start = time.perf_counter()
        page.keyboard.press(key)
        page.wait_for_function(
            """old => [...document.querySelectorAll('[data-testid="stMetric"]')]
                 .some(m => m.innerText.includes('Selected neurons') && !m.innerText.includes(old))""",
            arg=before,
            timeout=30_000,
        )
        timings[f"{name}_to_counts_s"] = time.perf_counter() - start
        settle(page)
        timings[f"{name}_to_redrawn_s"] = time.perf_counter() - start
        assert metric_value(page, "Selected neurons") != before
        before = metric_value(page, "Selected neurons")
    preset_t = preset_config("simu").mask.value
    for _ in range(round(preset_t * 100) - 1):  # back from t = 0.01 to the preset's t, for the run below
        page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, t]) => el.getAttribute('aria-valuetext') === t",
                           arg=[slider.element_handle(), f"{preset_t:.2f}"])  # fmt: skip
    time.sleep(1)
    settle(page)

    nav(page, "Unlearn")
    page.get_by_text("Mask from the Attribution page").wait_for(timeout=60_000)
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("12")
    steps.press("Enter")
    settle(page)
    page.get_by_text("Stop when forgotten").click()  # a short run of exactly 12 steps, no greedy checks
    settle(page)
    page.get_by_role("button", name="Launch unlearning").click()
    # a short run on the small model may end before the page redraws: then neither the progress bar nor
    # the live chart shows, only the finished run
    done = page.get_by_text("Evaluate this run")
    page.locator("[data-testid='stProgress']").first.or_(done).first.wait_for(timeout=60_000)
    live = page.get_by_text("Losses so far").first
    live.or_(done).first.wait_for(timeout=120_000)
    if live.is_visible():
        shot(page, "3_unlearn_running")
    done.wait_for(timeout=600_000)
    settle(page)
    result = page.locator("[data-testid='stAlert']", has_text=re.compile(r"^Run \S+: ")).first.inner_text()
    assert "ok" in result, result
    assert page.get_by_text("Losses during unlearning").count() >= 1
    shot(page, "3_unlearn")

    nav(page, "Evaluate")
    items = page.get_by_label("Items per split (at most)", exact=True)
    items.fill("40")
    items.press("Enter")
    settle(page)
    page.get_by_role("button", name="Evaluate this run").click()
    page.get_by_text("Forget quality", exact=True).wait_for(timeout=600_000)
    settle(page)
    shot(page, "4_evaluate")

    nav(page, "Mode connectivity")
    page.get_by_role("button", name="Compute the path").click()
    page.get_by_text("Forget barrier", exact=True).wait_for(timeout=300_000)
    settle(page)
    shot(page, "5_connectivity")

    nav(page, "Runs")
    page.get_by_text("Open a run").wait_for()
    settle(page)
    shot(page, "6_runs")

    (ARTIFACTS / "browser_timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")
    print("browser timings (s):", json.dumps({k: round(v, 2) for k, v in timings.items()}))

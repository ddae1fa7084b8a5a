"""The user's own data in a real browser (Debian's chromium via Playwright against `streamlit run app.py`):
an upload stays in use across pages, a bad upload never replaces a good one, an uploaded set is evaluated
and used for a connectivity path, and the knowledge check warns about a set the model does not know."""

from __future__ import annotations

import os
import re

import pytest

from tests.browser import HAVE_CHROMIUM, REPO, app_server, chromium, nav, settle

pytestmark = pytest.mark.skipif(not HAVE_CHROMIUM, reason="chromium not installed (apt-get install chromium)")

COMPANIES = (
    "question,answer\n"
    "Who founded Acme Rockets?,Ada Stone founded it in 1931.\n"
    "Where is Acme Rockets based?,In a glass tower in Oslo.\n"
    "What does Acme Rockets make?,Paper kites and toy engines.\n"
)
BAD_QUOTE = 'question,answer\nWho founded Acme Rockets?,"Ada Stone.\n'


@pytest.fixture(scope="module")
def server(builtin_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("browser_data_home")
    (home / "builtin").symlink_to(builtin_dir)
    env = {**os.environ, "SIMU_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    with app_server(env, REPO / "artifacts" / "streamlit-data.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, server):
    """A fresh browser session on Model & data."""
    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    p = context.new_page()
    p.goto(server)
    settle(p)
    p.get_by_text("MLP neurons").wait_for()
    yield p
    context.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads_src")
    (folder / "companies.csv").write_text(COMPANIES, encoding="utf-8")
    (folder / "bad_quote.csv").write_text(BAD_QUOTE, encoding="utf-8")
    return folder


def sidebar(page) -> str:
    return page.locator("[data-testid='stSidebar']").inner_text()


def upload_forget(page, path) -> None:
    """Choose "Upload JSONL/CSV" for the forget set and upload `path`; returns once the app has judged it."""
    page.locator("[data-testid='stRadio']", has_text="Forget set source").get_by_text("Upload JSONL/CSV").click()
    settle(page)
    choose_file(page, path)


def choose_file(page, path) -> None:
    page.locator("[data-testid='stFileUploader'] input[type=file]").first.set_input_files(str(path))
    page.get_by_text(path.name).first.wait_for()  # the uploader lists the file: its rerun has started
    page.get_by_text(re.compile(r"In use: the upload stored as|Could not read the uploaded")).first.wait_for()
    settle(page)


def test_upload_survives_navigation_and_shows_in_the_sidebar_at_once(page, files):
    upload_forget(page, files / "companies.csv")
    assert re.search(r"Forget\s+upload companies-[0-9a-f]{12}\.jsonl", sidebar(page)), sidebar(page)
    nav(page, "Runs")
    settle(page)
    nav(page, "Model & data")
    settle(page)
    page.get_by_text("MLP neurons").wait_for()
    assert "upload companies-" in sidebar(page)
    assert page.get_by_text(re.compile(r"In use: the upload stored as .*companies-")).count() == 1
    radio = page.locator("[data-testid='stRadio']", has_text="Forget set source")
    assert radio.locator("input[type=radio]").nth(1).is_checked()  # "Upload JSONL/CSV" is still chosen
    assert page.get_by_text(re.compile(r"Forget set.*: 3 items")).count() >= 1


def test_a_bad_upload_after_a_good_one_keeps_the_good_one(page, files):
    upload_forget(page, files / "companies.csv")
    good = re.search(r"companies-[0-9a-f]{12}\.jsonl", sidebar(page)).group(0)
    choose_file(page, files / "bad_quote.csv")
    page.get_by_text("an unterminated quote").first.wait_for()
    assert good in sidebar(page) and "builtin:forget10" not in sidebar(page)


def test_knowledge_warning_on_a_set_the_model_does_not_know(page, files):
    page.get_by_text("The model knows the forget set").wait_for()  # the built-in forget10 is known
    upload_forget(page, files / "companies.csv")
    page.get_by_text("does not seem to know the forget set").first.wait_for()
    nav(page, "Unlearn")
    settle(page)
    page.get_by_text("Nothing to unlearn?").wait_for()


@pytest.mark.slow
def test_an_uploaded_set_is_unlearned_evaluated_and_used_for_a_path(page, files):
    upload_forget(page, files / "companies.csv")
    nav(page, "Unlearn")
    settle(page)
    page.locator("[data-testid='stSelectbox']", has_text="Method").click()
    page.get_by_role("option", name=re.compile(r"^fo_graddiff")).click()  # no mask: starts at once
    settle(page)
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("3")
    steps.press("Enter")
    settle(page)
    page.get_by_role("button", name="Launch unlearning").click()
    page.get_by_text("Evaluate this run").wait_for(timeout=300_000)
    settle(page)

    nav(page, "Evaluate")
    settle(page)
    page.get_by_text("Before this run:").wait_for()  # the run kept its knowledge check
    items = page.get_by_label("Items per split (at most)", exact=True)
    items.fill("8")
    items.press("Enter")
    settle(page)
    page.get_by_role("button", name="Evaluate this run").click()
    page.get_by_text("Forget quality", exact=True).wait_for(timeout=600_000)
    settle(page)
    assert page.get_by_text("cannot read data spec").count() == 0
    # the forget split's per-item table is the upload's (its caption names the stored file)
    page.get_by_text(re.compile(r"3 of 3 items of companies-[0-9a-f]{12}")).first.wait_for()

    nav(page, "Mode connectivity")
    settle(page)
    points = page.get_by_label("Points along t", exact=True)
    points.fill("3")
    points.press("Enter")
    settle(page)
    page.get_by_role("button", name="Compute the path").click()
    page.get_by_text("Forget barrier", exact=True).wait_for(timeout=300_000)
    assert page.get_by_text("reads its data by name").count() == 0

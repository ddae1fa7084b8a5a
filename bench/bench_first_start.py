"""First start of the app on a fresh SIMU_HOME, measured in a real browser (issue: first start).

Starts `streamlit run app.py` on an empty SIMU_HOME, opens it in headless chromium and measures, from the
moment the server is started:
- time to the first usable page (Model & data shows the built-in model) and to the first attribution chart;
- time until the whole built-in default (every model, retain references included) is ready;
- the quality bar: greedy exact match of `full` on its training facts (>= 0.95) and of each retain reference
  on its forget split (<= 0.05), read from the build's manifest;
- with --train, also the time to train every part from scratch in this process (what a non-default size or
  `build-default --train` costs), part by part.

Run it alone: the machine is shared and times move with its load (the load average is recorded).

    .venv/bin/python bench/bench_first_start.py [--size default] [--train] [--out bench/results/first_start.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, RESULTS, write_json  # noqa: E402

sys.path.insert(0, str(REPO))
from simu_core import builtin  # noqa: E402
from simu_core.config import builtin_config  # noqa: E402
from tests.browser import app_server, chromium, nav, settle  # noqa: E402

FULL_EM_BAR, RETAIN_EM_BAR = 0.95, 0.05


def first_start(size: str, home: Path) -> dict:
    """Times (seconds from server start) to the usable first page, the first attribution chart, the whole default."""
    env = {**os.environ, "SIMU_HOME": str(home), "SIMU_BUILTIN_SIZE": size, "HF_HUB_OFFLINE": "1"}
    root = home / ("builtin" if size == "default" else f"builtin-{size}")
    times: dict[str, float] = {}
    start = time.perf_counter()
    with app_server(env, REPO / "artifacts" / "bench-first-start.log") as url, chromium() as browser:
        times["server_healthy_s"] = time.perf_counter() - start
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        page.get_by_text("MLP neurons").wait_for(timeout=1_800_000)
        times["model_page_usable_s"] = time.perf_counter() - start
        settle(page, timeout_ms=600_000)
        nav(page, "Attribution")
        page.locator(".js-plotly-plot").first.wait_for(timeout=600_000)
        times["first_attribution_chart_s"] = time.perf_counter() - start
        while builtin.missing_parts(root):
            time.sleep(0.5)
        times["whole_default_ready_s"] = time.perf_counter() - start
        settle(page, timeout_ms=600_000)
    manifest = builtin.read_manifest(root)
    return {
        "times": times,
        "manifest": manifest,
        "sources": {p: e.get("source", "trained") for p, e in manifest["parts"].items()},
    }


def quality_bar(manifest: dict) -> dict:
    em = manifest["exact_match"]
    refs = {k: v for k, v in em.items() if k.startswith("retain") and "/forget" in k}
    return {
        "full_em_on_training_facts": em["full/full"],
        "retain_em_on_their_forget_splits": refs,
        "passes": em["full/full"] >= FULL_EM_BAR and all(v <= RETAIN_EM_BAR for v in refs.values()),
    }


def train_from_scratch(size: str, folder: Path) -> dict:
    """Seconds to train each part here (no shipped copy), in this process."""
    start = time.perf_counter()
    manifest = builtin.build(folder, builtin_config(size), use_shipped=False)
    return {
        "total_s": time.perf_counter() - start,
        "parts_s": {p: e["seconds"] for p, e in manifest["parts"].items()},
        "quality": quality_bar(manifest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=("default", "small"))
    parser.add_argument("--train", action="store_true", help="also time a build from scratch (minutes)")
    parser.add_argument("--out", default=str(RESULTS / "first_start.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="simu-first-start-") as tmp:
        result = first_start(args.size, Path(tmp) / "home")
        result["quality"] = quality_bar(result.pop("manifest"))
        if args.train:
            result["train_from_scratch"] = train_from_scratch(args.size, Path(tmp) / "trained")
    result.update(
        size=args.size,
        targets={"first_usable_page_and_chart_s": 90, "whole_default_s": 180},
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    )
    print(f"{'measure':<34}{'seconds':>10}")
    for name, value in result["times"].items():
        print(f"{name:<34}{value:>10.1f}")
    if "train_from_scratch" in result:
        for part, seconds in result["train_from_scratch"]["parts_s"].items():
            print(f"{'train ' + part:<34}{seconds:>10.1f}")
    print(f"quality bar passes: {result['quality']['passes']} ({result['quality']})")
    print(f"load average before/after: {load_before} / {result['load_average_after']}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

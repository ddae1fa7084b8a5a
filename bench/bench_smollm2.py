"""SmolLM2-135M on this machine: GGUF conversion, cache size, load time, greedy speed, known facts.

    python bench/bench_smollm2.py [--fresh] [--threads 2] [--out bench/results/smollm2.json]

Uses $SIMU_HOME (the wheel in downloads/ or pip, the converted folder, the knowledge benchmark
when built). `--fresh` also times a conversion from scratch into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _common  # noqa: F401  (puts the repo on sys.path)
import torch

from simu_core import knowledge, models, pretrained


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _time_generation(loaded, prompts: list[str], batch: int, stop: bool, new_tokens: int = 12) -> dict:
    start = time.perf_counter()
    models.greedy_answers(
        loaded.model, loaded.tokenizer, loaded.fmt, prompts, new_tokens, batch, stop_at_newline=stop
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "prompts": len(prompts),
        "batch_size": batch,
        "stop_at_newline": stop,
        "max_new_tokens": new_tokens,
        "seconds": round(seconds, 2),
        "prompts_per_s": round(len(prompts) / seconds, 2),
        "new_tokens_per_s_upper": round(len(prompts) * new_tokens / seconds, 1),  # exact without stopping
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true", help="also time a conversion from scratch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(_common.RESULTS / "smollm2.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "load_average_at_start": os.getloadavg()}

    start = time.perf_counter()
    folder = pretrained.ensure_pretrained("smollm2", progress=lambda m, f: print(f"[{f:.2f}] {m}"))
    result["ensure_seconds"] = round(time.perf_counter() - start, 2)
    manifest = pretrained.read_conversion(folder)
    result["conversion"] = {
        "seconds_recorded": manifest["seconds"],
        "gguf_bytes": manifest["source_bytes"],
        "folder_bytes": _folder_bytes(folder),
        "files": manifest["files"],
    }
    if args.fresh:
        with tempfile.TemporaryDirectory() as tmp, pretrained.obtained_gguf(pretrained.SMOLLM2) as (path, _):
            start = time.perf_counter()
            pretrained.convert_gguf(path, root=tmp, sha256=pretrained.SMOLLM2.sha256)
            result["conversion"]["seconds_fresh"] = round(time.perf_counter() - start, 1)

    loads = []
    for _ in range(2):
        start = time.perf_counter()
        loaded = models.load_model(str(folder), device="cpu")
        loads.append(time.perf_counter() - start)
    result["load_seconds"] = [round(s, 2) for s in loads]
    result["parameters"] = sum(p.numel() for p in loaded.model.parameters())

    prompts = [it["question"] for it in knowledge.fact_items()]
    result["generation"] = [
        _time_generation(loaded, prompts[:8], 1, stop=False),
        _time_generation(loaded, prompts[:64], 64, stop=False),
        _time_generation(loaded, prompts[:64], 64, stop=True),
    ]
    kb = knowledge.read_manifest(knowledge.knowledge_root("smollm2"))
    if kb is not None:
        result["knowledge"] = {k: kb[k] for k in ("facts", "known", "splits", "families", "seconds", "batch_size")}
    result["load_average_at_end"] = os.getloadavg()
    _common.write_json(args.out, result)
    for row in result["generation"]:
        print(row)


if __name__ == "__main__":
    main()

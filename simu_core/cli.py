"""Command line: `python -m simu_core <command> ...` (a thin layer over the library).

Every command prints progress to stderr and its result to stdout; with `--json` the last line
of stdout is a JSON summary. User errors (`SimuError`) print one line and exit with code 2.

Adding a command is one function decorated with `@command(name, help, arguments)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from simu_core.errors import SimuError

Arguments = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Arguments, Callable[[argparse.Namespace], dict]]] = {}


def command(name: str, help: str, arguments: Arguments) -> Callable:
    """Register `fn(args) -> summary dict` as the subcommand `name`."""

    def register(fn: Callable[[argparse.Namespace], dict]) -> Callable:
        _COMMANDS[name] = (help, arguments, fn)
        return fn

    return register


def stderr_progress(message: str, fraction: float) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)


def ensure_builtin_for(*specs: str | None) -> None:
    """Build the built-in default first if any spec names it and it is missing."""
    if any(s and s.startswith("builtin:") for s in specs):
        from simu_core.models import ensure_builtin

        ensure_builtin(progress=stderr_progress)


# --------------------------------------------------------------------------------------------
# build-default
# --------------------------------------------------------------------------------------------


def _build_default_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default: $SIMU_HOME/builtin)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")
    p.add_argument("--authors", type=int, default=None, help="number of trained authors (default 200)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")


@command("build-default", "build the built-in authors benchmark and tiny models (cached)", _build_default_args)
def build_default_cmd(args: argparse.Namespace) -> dict:
    from simu_core.config import BuiltinConfig, builtin_root
    from simu_core.models import build_default, builtin_status, read_manifest

    config = BuiltinConfig(seed=args.seed)
    if args.authors is not None:
        config.n_authors = args.authors
    if args.epochs is not None:
        config.train.epochs = args.epochs
    out = args.out or str(builtin_root())
    status = builtin_status(out, config)
    if status == "ok" and not args.force:
        manifest = read_manifest(out)
        print(f"up to date: {out}", file=sys.stderr)
        built = False
    else:
        manifest = build_default(out, config, stderr_progress)
        built = True
    return {
        "out": out,
        "built": built,
        "data": f"{out}/data",
        "models": {name: f"{out}/models/{name}" for name in ("full", "retain01", "retain05", "retain10")},
        "exact_match": manifest["exact_match"],
        "seconds": manifest["seconds"],
    }


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simu_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = args.func(args)
    except SimuError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0

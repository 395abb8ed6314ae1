"""The ``davit`` command. Each group of subcommands lives in its own module, which exposes
``register(subparsers)``; modules are imported lazily-by-listing here so `davit --help` shows everything."""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that add subcommands, in the order they appear in --help
COMMAND_MODULES = [
    "davit.cli_models",  # info, list, convert
    "davit.train.cli",  # train, eval, predict, demo
    "davit.cli_viz",  # viz
    "davit.bench",  # bench
    "davit.export",  # export
    "davit.tasks.cli",  # detect, segment, data scenes
    "davit.data.cli",  # data shards, data check
]


def positive_int(text: str) -> int:
    """argparse type of sizes and counts (``type=positive_int``): 0 would otherwise read as "not given"
    where a command falls back with ``args.x or default``, and a negative size fails deep inside torch."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v} (leave it out for the default)")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="davit",
        description="DaViT: Dual Attention Vision Transformers — models, weights, training, tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
        # user-facing errors carry their own explanation; no traceback unless asked
        if getattr(args, "debug", False):
            raise
        print(f"davit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`skipgpt`: one command, one subcommand per job. `skipgpt <command> --help` explains each."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SkipGPTError

# Each module defines add_parser(subparsers) and run(args); heavy imports stay inside run().
COMMANDS = ["demo", "train", "eval", "bench", "compare", "analyze", "info"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipgpt",
        description=(
            "SkipGPT: per-token routers before every attention and MLP module of a decoder-only LLM. "
            "Tune routers to a target sparsity (train), measure quality (eval), measure speed (bench), "
            "compare against baselines at equal sparsity (compare) and look at what was learned (analyze)."
        ),
        epilog="Models: a hub name, a local HF folder, a .gguf file, or the embedded alias smollm2-135m.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"skipgpt.cli.{name}")
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args._run(args)
    except SkipGPTError as e:
        print(f"skipgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skipgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

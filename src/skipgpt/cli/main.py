"""`skipgpt`: one command, one subcommand per job. `skipgpt <command> --help` explains each."""

from __future__ import annotations

import errno
import os
import sys

from ..errors import SkipGPTError
from . import analyze, bench, compare, demo, generate, info, train
from . import eval as evaluate
from .common import Parser

# Each module defines add_parser(subparsers) and run(args); the shared flags come from .common.
# File-system errors that the user's environment causes, not skipgpt: one line, like bad input.
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                            errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG})
COMMANDS = {"demo": demo, "train": train, "eval": evaluate, "bench": bench, "generate": generate,
            "compare": compare, "analyze": analyze, "info": info}


def build_parser() -> Parser:
    parser = Parser(
        prog="skipgpt",
        description=(
            "SkipGPT: per-token routers before every attention and MLP module of a decoder-only LLM. "
            "Tune routers to a target sparsity (train), measure quality (eval), measure speed (bench), "
            "compare against baselines at equal sparsity (compare) and look at what was learned (analyze)."
        ),
        epilog="Models: a hub name, a local HF folder, a .gguf file, or the embedded alias smollm2-135m.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The exit status of `skipgpt ARGV...`: 0, 2 for bad input (one line on stderr), 130 if interrupted, 141 when
    the reader of stdout left (`skipgpt generate ... | head`), as a shell reports a program that SIGPIPE ended."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Nothing more can be shown; stdout goes to /dev/null so the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or argparse's one-line error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        result = args._run(args)
    except SkipGPTError as e:
        print(f"skipgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"skipgpt {args.command}: error: {e.strerror}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skipgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

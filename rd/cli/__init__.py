"""The command line: ``python -m rd COMMAND``. Thin: it parses, calls the library, prints.

One module per command group; ``argparse`` is used here and nowhere else in ``rd``. Library
functions raise errors derived from ``rd.errors.RDError``; ``main`` turns them into a one-line
``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from rd.cli import checkpoints, data, evaluate, jobs, novelty, predict, train
from rd.errors import RDError

# Besides the package's own errors: a bad path or permission (OSError) and a bad value that a
# library (torch, PIL) or a check refuses (ValueError) are the user's to fix, not tracebacks.
KNOWN_ERRORS = (RDError, ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rd", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_parser(commands)
    evaluate.add_parser(commands)
    predict.add_parser(commands)
    checkpoints.add_import_parser(commands)
    data.add_holdout_parser(commands)
    data.add_register_parser(commands)
    data.add_builtin_parser(commands)
    data.add_download_parser(commands)
    jobs.add_parser(commands)  # after train: `jobs submit` takes its options
    novelty.add_parser(commands)
    checkpoints.add_export_parser(commands)
    checkpoints.add_position_parser(commands)
    checkpoints.add_aligned_parser(commands)
    checkpoints.add_turn_average_parser(commands)
    checkpoints.add_info_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (2 and a one-line ``error:`` for a known error)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KNOWN_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

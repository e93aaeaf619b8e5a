"""`python -m trainer {train,evaluate,deblur,export} ...`: a thin dispatcher to each command's main(argv).

`--version` (here or after a command) prints the package and code version (common.version).

User errors (bad config, missing files, bad input) from any command become one `error:` line on
stderr and exit status 2.

The command modules are imported only when called, so `python -m trainer deblur` does not pay
for TensorBoard and `--help` of one command works even while another is broken.
"""

from __future__ import annotations

import importlib
import sys

from common.errors import run_cli
from common.version import version_text

COMMANDS = {
    "train": ("trainer.train", "train the network on rendered shards"),
    "evaluate": ("trainer.evaluate", "score a checkpoint on a split against the baselines"),
    "deblur": ("trainer.deblur", "deblur your own burst of photos (default: the shipped model)"),
    "export": ("trainer.export", "write a checkpoint's weights and config for inference"),
}

USAGE = "usage: python -m trainer [--version] {" + ",".join(COMMANDS) + "} [--help] ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [USAGE, "", "commands:"] + [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
        lines.append("\n`python -m trainer COMMAND --help` describes a command's options.")
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(version_text())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\nerror: unknown command '{command}' (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run_cli(lambda: module.main(rest))


if __name__ == "__main__":
    sys.exit(main())

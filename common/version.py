"""``--version`` of every command: the package version and the pipeline's code version, the string
a dataset's manifest.json records as ``code_version`` (``pipeline.run.code_version``: the package
version + a hash of the source that renders samples). Checkpoints record it too, beside the
software versions (``trainer.checkpoint.software_versions``).

The text is computed only when ``--version`` is given: hashing the source needs pipeline.run,
which a command's other paths should not pay for (and common imports nothing of the pipeline
otherwise).
"""

from __future__ import annotations

import argparse


def version_text() -> str:
    """One line, e.g. ``burst-deblur 0.1.0 (code version 0.1.0+3f2a9c1d0b4e)``."""
    from pipeline import __version__
    from pipeline.run import code_version

    return f"burst-deblur {__version__} (code version {code_version()})"


class _VersionAction(argparse.Action):
    """argparse's "version" action, with the text computed when the flag is used."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def add_version(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``--version`` flag that prints ``version_text()`` and exits 0."""
    parser.add_argument("--version", action=_VersionAction,
                        help="print the package and code version (as manifests record it) and exit")

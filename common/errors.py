"""User-facing errors: one base class, caught in one place by each command line.

A ``UserError`` is a problem the user can fix (a bad config value, a missing file, a corrupt
shard, a frame that cannot be aligned); its message is one line naming the thing and the
problem, and the CLIs print it as ``error: <message>`` with a non-zero exit. Anything else
that escapes a command is a bug and shows its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's input or environment; the message is one line.

    A ValueError so that callers that catch ValueError (the Python API's convention for bad
    arguments) keep working."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): what a CLI
    prints after "error: "."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    return text[0] if text else type(e).__name__


def flat(e: BaseException) -> str:
    """An exception's whole message on one line (whitespace runs collapsed; its type name if it
    has none): for messages whose later lines matter (Pillow's, torch's load_state_dict)."""
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(command, interrupted: str = "interrupted") -> int:
    """Run ``command()`` (returns an exit code) as a command line does: a UserError or an OSError
    (a missing file, a full disk: the user's environment) becomes one ``error: ...`` line on
    stderr and exit ``e.exit_code`` (2 unless the error says otherwise); Ctrl-C prints
    ``interrupted`` and exits 130 (143 for SIGTERM delivered as a KeyboardInterrupt subclass
    with ``exit_code``). Anything else is a bug: it propagates with its traceback. The one place
    the project's CLIs catch errors."""
    import sys

    try:
        return command()
    except (UserError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr)
        return getattr(e, "exit_code", 130)

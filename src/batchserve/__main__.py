"""``batchserve``, the console script, and ``python -m batchserve``: the command line.

The command line comes with the ``server`` extra (typer, rich, the HTTP stack); without it
this says so in one line instead of a traceback from the first import.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run :data:`batchserve.cli.app`; a missing extra, here or in a command, is one line and exit status 2."""
    from batchserve.extras import MissingExtraError, needs_extra

    try:
        with needs_extra("server", "the batchserve command"):
            from batchserve.cli import app
        app()
    except MissingExtraError as error:
        print(f"batchserve: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The option tables of docs/settings.md, generated from the ``batchserve`` commands themselves.

Every option of ``serve`` and ``worker`` is built from its field in :mod:`batchserve.settings`
(default, bounds, help), and ``bench``'s are declared in :mod:`batchserve.cli`; this module reads
them back from the command functions' typer parameters (flags, default, help), so a table in the
docs says what ``--help`` says and no default is restated by hand.  A docs page marks each table's place with a pair of comments::

    <!-- options: serve -->
    ...the generated table...
    <!-- end options -->

``python -m batchserve.clidoc docs/settings.md`` rewrites the tables between the markers;
``--check`` only compares, and exits 1 naming the tables that differ (tests/test_docs.py runs it).
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

MARKER = re.compile(r"(<!-- options: (?P<command>[\w-]+) -->\n)(?P<table>.*?)(<!-- end options -->)", re.DOTALL)


def command(name: str) -> Any:
    """The function behind ``batchserve NAME``: its parameters' defaults are typer's option infos."""
    from batchserve import cli

    function = getattr(cli, name.replace("-", "_"), None)  # run-batch: cli.run_batch
    if name.startswith("_") or not callable(function) or not _parameters(function):
        raise ValueError(f"batchserve has no command {name!r}")
    return function


def _parameters(function: Any) -> list[tuple[str, Any, Any]]:
    """(name, annotation, typer info) of each typer parameter of ``function``, in order."""
    import typer.models

    hints = typing.get_type_hints(function)
    return [
        (name, hints.get(name), parameter.default)
        for name, parameter in inspect.signature(function).parameters.items()
        if isinstance(parameter.default, typer.models.ParameterInfo)
    ]


def options_table(name: str) -> str:
    """A markdown table of the options of ``batchserve NAME``: flags, default, meaning."""
    import typer.models

    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for parameter, annotation, info in _parameters(command(name)):
        if isinstance(info, typer.models.OptionInfo) and not info.hidden:
            rows.append(f"| {_flags(parameter, annotation, info)} | {_default(annotation, info)} | {_escape(info.help or '')} |")
    return "\n".join(rows) + "\n"


def arguments(name: str) -> list[str]:
    """The positional arguments of ``batchserve NAME`` (``bench URL``), in capitals as ``--help`` shows them."""
    import typer.models

    return [parameter.upper() for parameter, _, info in _parameters(command(name)) if isinstance(info, typer.models.ArgumentInfo)]


def _flags(parameter: str, annotation: Any, info: Any) -> str:
    """The option's flags, the long form first; an enumeration's choices after it (no other metavar:
    the meaning says what the value is)."""
    declared = [flag for decl in info.param_decls for flag in decl.split("/")]
    flags = declared or [f"--{parameter.replace('_', '-')}"]
    if _base(annotation) is bool:
        return " / ".join(f"`{flag}`" for flag in flags)
    flags.sort(key=len, reverse=True)
    base = _base(annotation)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        flags[0] += " " + "|".join(str(member.value) for member in base)
    return ", ".join(f"`{_escape(flag)}`" for flag in flags)


def _base(annotation: Any) -> Any:
    """``int`` for ``Optional[int]``, ``AppName`` for ``List[AppName]``."""
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    return _base(arguments[0]) if arguments else annotation


def _default(annotation: Any, info: Any) -> str:
    if info.default is ...:
        return "(required)"
    if isinstance(info.show_default, str):
        return f"`{_escape(info.show_default)}`"
    if info.show_default is False:
        return "—"
    default = info.default
    if _base(annotation) is bool and "/" in "".join(info.param_decls):
        on, off = info.param_decls[0].split("/")
        return f"`{on if default else off}`"
    if default is None or default == [] or default == ():
        return "—"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool):
        return "on" if default else "off"
    if default == "":
        return "empty"
    return f"`{default}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render(text: str) -> str:
    """``text`` with every marked table replaced by the generated one."""
    return MARKER.sub(lambda match: match.group(1) + options_table(match.group("command")) + match.group(4), text)


def stale_tables(text: str) -> list[str]:
    """The commands whose marked table in ``text`` differs from the generated one."""
    return [match.group("command") for match in MARKER.finditer(text) if match.group("table") != options_table(match.group("command"))]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(arg) for arg in argv if arg != "--check"]
    if not paths:
        print("usage: python -m batchserve.clidoc [--check] PAGE.md ...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        text = path.read_text()
        if not MARKER.search(text):
            print(f"{path}: no <!-- options: COMMAND --> marker", file=sys.stderr)
            status = 1
        elif check:
            stale = stale_tables(text)
            if stale:
                print(f"{path}: tables out of date: {', '.join(stale)} (run python -m batchserve.clidoc {path})", file=sys.stderr)
                status = 1
        else:
            path.write_text(render(text))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

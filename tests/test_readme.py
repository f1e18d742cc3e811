"""Every command and code block of the README runs as written (the shape of LitServe's test_readme).

The README's blocks are read in order and grouped into steps, each run by one rule:

* a ``python`` block is a script: written to a file and run in a subprocess (with a timeout) in a
  scratch directory; it must exit 0;
* a ``python`` block whose first line is ``# NAME.py`` is a module: written as ``NAME.py`` into the
  scratch directory, for the ``batchserve serve --model`` of the next shell block;
* a ``bash`` block with a ``batchserve serve`` line starts that server (on a free port: ``--port``
  is added, and ``localhost:8000`` / ``127.0.0.1:8000`` are rewritten everywhere), waits for
  ``/readyz``, then runs the block's other commands one at a time (``curl`` fails on an HTTP
  error) and the ``python`` blocks that follow it (clients of that server), and stops it;
* a ``# -> TEXT`` comment after a command is what it prints: the parts of TEXT between ``...``
  must appear in the output, in order;
* ``make run`` is started (``HOST``, ``PORT`` set; its ``venv`` prerequisite not remade: see
  :data:`MAKE_RULES`), checked ready, and stopped;
* a command that cannot run inside the suite is skipped by its rule in :data:`NOT_RUN` (pytest
  reports the skip and the reason); any other block or command this file cannot run fails.

The README also stays a first page: at most 250 lines, and every link into the repository
resolves (anchors included).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
MAX_LINES = 250

BLOCK = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MODULE_HEADER = re.compile(r"^# (?P<name>[\w]+\.py)\n")
PORT_IN_TEXT = re.compile(r"\b(localhost|127\.0\.0\.1):8000\b")
EXPECTED = "# -> "

#: commands the suite does not run, each with the reason (the test's skip message)
NOT_RUN = {
    "make test": "it runs this very suite (and installs system packages): a suite cannot run itself",
}

#: how a make command runs here, and why it differs from the README's letter
MAKE_RULES = {
    "make run": (
        "make -o venv run HOST=127.0.0.1 PORT={port}",
        (
            "on a free port; `-o venv`: the venv is `make test`'s first step, already built when the suite runs "
            "(remaking it after a pyproject.toml edit would take minutes)"
        ),
    ),
}

SCRIPT_TIMEOUT = 120.0
READY_TIMEOUT = 180.0


@dataclass
class Block:
    lang: str
    code: str
    line: int  # where its fence is in the README, 1-based

    @property
    def module_name(self) -> str | None:
        match = MODULE_HEADER.match(self.code)
        return match.group("name") if self.lang == "python" and match else None


@dataclass
class Step:
    """Blocks run together: modules, then a shell block, then the python clients of its server."""

    kind: str  # "make", "script", "shell"
    command: str = ""  # for "make": the one make command of this step
    shell: Block | None = None
    script: Block | None = None
    modules: list[Block] = field(default_factory=list)
    clients: list[Block] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        return [*self.modules, *(block for block in (self.shell, self.script) if block), *self.clients]

    @property
    def id(self) -> str:
        first = self.shell or self.script
        assert first is not None
        if self.kind == "make":
            return f"line-{first.line}-{self.command.replace(' ', '-')}"
        return f"line-{first.line}-{self.kind}"


def readme_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    return [
        Block(match.group("lang"), match.group("code"), text.count("\n", 0, match.start()) + 1)
        for match in BLOCK.finditer(text)
    ]


def commands(code: str) -> list[tuple[str, str | None]]:
    """The shell commands of a block, each with the ``# -> `` output that follows it (or None).

    A command runs on over lines that end with a backslash or leave a quote open."""
    found: list[tuple[str, str | None]] = []
    pending = ""
    for line in code.splitlines():
        if not pending and line.lstrip().startswith("#"):
            if line.startswith(EXPECTED) and found and found[-1][1] is None:
                found[-1] = (found[-1][0], line[len(EXPECTED):])
            continue
        if not pending and not line.strip():
            continue
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        found.append((pending.rstrip("\n"), None))
        pending = ""
    assert not pending, f"unterminated command in the README: {pending!r}"
    return found


def is_server(command: str) -> bool:
    return command.startswith("batchserve serve")


def bare(command: str) -> str:
    """The command without its comment."""
    return command.split("#")[0].strip()


def is_make(command: str) -> bool:
    return bare(command) in MAKE_RULES or bare(command) in NOT_RUN


def steps(blocks: list[Block] | None = None) -> list[Step]:
    """The README's blocks grouped into steps; a block no rule covers is an error."""
    blocks = readme_blocks() if blocks is None else blocks
    result: list[Step] = []
    modules: list[Block] = []
    serving: Step | None = None  # the last shell step that started a server
    for block in blocks:
        if block.lang == "python" and block.module_name:
            modules.append(block)
            serving = None
        elif block.lang == "python" and serving is not None and PORT_IN_TEXT.search(block.code):
            serving.clients.append(block)
        elif block.lang == "python":
            result.append(Step("script", script=block))
            serving = None
        elif block.lang in ("bash", "sh", "shell"):
            cmds = [command for command, _ in commands(block.code)]
            if cmds and all(is_make(command) for command in cmds):
                result.extend(Step("make", shell=block, command=bare(command)) for command in cmds)
                serving = None
                continue
            if sum(is_server(command) for command in cmds) != 1 or not is_server(cmds[0]):
                raise AssertionError(
                    f"README line {block.line}: a shell block must be make commands, or start with one "
                    f"`batchserve serve` and then talk to it; no rule runs this one"
                )
            serving = Step("shell", shell=block, modules=modules)
            modules = []
            result.append(serving)
        else:
            raise AssertionError(f"README line {block.line}: no rule runs a {block.lang or 'plain'!r} block")
    assert not modules, f"README line {modules[0].line}: module {modules[0].module_name} is used by no shell block"
    return result


STEPS = steps()


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}


def stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process's group (a server's workers, make's child), then SIGKILL; reaped."""
    if process.poll() is None:
        with _gone():
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with _gone():
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with _gone():  # what is left of the group (make's child outliving make)
        os.killpg(process.pid, signal.SIGKILL)


class _gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is ProcessLookupError or kind is PermissionError


@pytest.fixture
def processes():
    """Start background processes through this; each is stopped, with its group, after the test."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
        with open(log, "wb") as output:
            process = subprocess.Popen(
                argv, cwd=cwd, env=environment(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(process)
        return process

    yield start
    for process in started:
        stop(process)


def wait_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} before it was ready:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server was not ready within {READY_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")


def with_port(text: str, port: int) -> str:
    return PORT_IN_TEXT.sub(f"127.0.0.1:{port}", text)


def run_script(block: Block, directory: Path, port: int | None = None) -> str:
    code = block.code if port is None else with_port(block.code, port)
    path = directory / f"readme_line_{block.line}.py"
    path.write_text(code)
    try:
        done = subprocess.run(
            [sys.executable, str(path)], check=False, cwd=directory, env=environment(), capture_output=True, text=True,
            timeout=SCRIPT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"README line {block.line}: still running after {SCRIPT_TIMEOUT:.0f} s:\n{timeout.stderr or ''}")
    assert done.returncode == 0, f"README line {block.line} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error --max-time 120 "$@"; }
"""


def run_command(command: str, expected: str | None, directory: Path, port: int, line: int) -> None:
    script = PRELUDE + with_port(command, port) + "\n"
    try:
        done = subprocess.run(
            ["bash", "-c", script], check=False, cwd=directory, env=environment(), capture_output=True, text=True,
            timeout=SCRIPT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"README block at line {line}: `{command}` still running after {SCRIPT_TIMEOUT:.0f} s")
    assert done.returncode == 0, (
        f"README block at line {line}: `{command}` exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    if expected is not None:
        assert_shows(done.stdout, expected, command)


def assert_shows(output: str, expected: str, command: str) -> None:
    """The parts of ``expected`` between ``...`` appear in ``output``, in order."""
    position = 0
    for part in (part for part in expected.split("...") if part):
        found = output.find(part, position)
        assert found >= 0, f"`{command}` printed\n{output[:2000]}\nwhich lacks {part!r} (expected {expected!r})"
        position = found + len(part)


# --------------------------------------------------------------------------- the tests


def test_readme_is_a_first_page():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; at most {MAX_LINES}: move reference to docs/"


def test_every_block_is_run_by_a_rule():
    """Each block belongs to one step (a block of make commands: one step per command)."""
    lines = [block.line for step in STEPS if step.kind != "make" for block in step.blocks]
    make_lines = {block.line for step in STEPS if step.kind == "make" for block in step.blocks}
    assert len(lines) == len(set(lines)) and not set(lines) & make_lines, "a block is run by two steps"
    assert sorted(set(lines) | make_lines) == [block.line for block in readme_blocks()]
    assert {step.command for step in STEPS if step.kind == "make"} >= {"make run", "make test"}, (
        "the README lost its two commands"
    )


@pytest.mark.parametrize("step", STEPS, ids=[step.id for step in STEPS])
def test_readme_step(step: Step, tmp_path: Path, processes):
    if step.kind == "script":
        assert step.script is not None
        run_script(step.script, tmp_path)
    elif step.kind == "make":
        assert step.shell is not None
        run_make_block(step.shell, step.command, tmp_path, processes)
    else:
        run_shell_step(step, tmp_path, processes)


def run_make_block(block: Block, command: str, directory: Path, processes) -> None:
    if command in NOT_RUN:
        pytest.skip(f"README line {block.line}: `{command}` is not run here: {NOT_RUN[command]}")
    template, _why = MAKE_RULES[command]
    port = free_port()
    log = directory / "make.log"
    process = processes(shlex.split(template.format(port=port)), ROOT, log)
    wait_ready(process, port, log)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    stop(process)
    assert process.returncode is not None


def run_shell_step(step: Step, directory: Path, processes) -> None:
    assert step.shell is not None
    for module in step.modules:
        (directory / module.module_name).write_text(module.code)
    (server_command, _), *rest = commands(step.shell.code)
    port = free_port()
    log = directory / "server.log"
    argv = [*shlex.split(server_command, comments=True), "--port", str(port)]
    process = processes(argv, directory, log)
    wait_ready(process, port, log)
    for command, expected in rest:
        run_command(command, expected, directory, port, step.shell.line)
    for client in step.clients:
        run_script(client, directory, port)
    assert process.poll() is None, f"the server died during the step:\n{log.read_text()[-4000:]}"


# --------------------------------------------------------------------------- links


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def broken_links(page: Path) -> list[str]:
    """The links of ``page`` into the repository whose file or anchor does not exist."""
    broken = []
    for match in LINK.finditer(page.read_text()):
        target = match.group("target")
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def test_readme_links_resolve():
    assert broken_links(README) == []
    assert any("docs/" in match.group("target") for match in LINK.finditer(README.read_text()))


def test_the_link_check_sees_a_broken_anchor(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section (`code`)\n\n[ok](#a-section-code) [bad](#nope) [gone](missing.md)\n")
    problems = [problem.split(":")[0] for problem in broken_links(page)]
    assert problems == ["#nope", "missing.md"]


def test_commands_split_as_the_shell_would():
    code = "make run   # one\ncurl -s x -d '{\"a\":\n  1}'\n# -> {\"a\"...1}\nls \\\n  -l\n"
    assert commands(code) == [
        ("make run   # one", None),
        ("curl -s x -d '{\"a\":\n  1}'", '{"a"...1}'),
        ("ls \\\n  -l", None),
    ]


def test_expected_output_is_matched_in_order():
    assert_shows('{"text":"twinkle twinkle little star.","fills":[]}', '{"text":"twinkle...little star."...', "curl")
    with pytest.raises(AssertionError, match="lacks"):
        assert_shows('{"b":2,"a":1}', '"a"..."b"', "curl")

"""Run a small Python script in a child interpreter and check that it exits quietly.

"Quietly": exit status 0 and none of the noise asyncio and the warnings machinery print
when a program leaves tasks, loops or coroutines behind at exit.  The child runs with
``-W default``, so a ResourceWarning (an unclosed event loop, socket or file) is shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import PYTHONPATH, ROOT

NOISE = (
    "Task was destroyed",
    "Event loop is closed",
    "was never awaited",
    "ResourceWarning",
    "Exception ignored",
    "Traceback",
)


def run_script(code: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) with this interpreter (the venv's); return what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH}
    env.pop("PYTHONWARNINGS", None)
    command = [sys.executable, "-W", "default", "-c", textwrap.dedent(code), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_quiet(done: subprocess.CompletedProcess) -> None:
    """Exit status 0, and no exit-time noise on stderr."""
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr}"
    found = [pattern for pattern in NOISE if pattern in done.stderr]
    assert not found, f"{found} on stderr:\n{done.stderr}"


def noisy(stderr: str) -> list[str]:
    """The noise patterns found in ``stderr``."""
    return [pattern for pattern in NOISE if pattern in stderr]

"""The house's import promises (docs/ARCHITECTURE.md, "Layers"), checked in a fresh
interpreter: what a module pulls in when imported alone."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import batchserve.runtimes


def imported_with(module: str) -> list[str]:
    """The batchserve modules loaded by importing ``module`` alone."""
    script = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('batchserve'))))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "module", ["batchserve.server.json_response", "batchserve.server.json_route", "batchserve.server.openai_errors"]
)
def test_the_servers_plumbing_imports_neither_the_app_nor_the_apps(module):
    loaded = imported_with(module)
    assert "batchserve.server.app" not in loaded
    assert not [name for name in loaded if name.startswith("batchserve.apps")]


def test_the_redis_worker_imports_nothing_above_the_backends():
    loaded = imported_with("batchserve.backends.redis.worker")
    above = ("batchserve.apps", "batchserve.server", "batchserve.cli", "batchserve.compat")
    assert [name for name in loaded if name.startswith(above)] == []


def test_the_llama_runtime_never_imports_the_torch_runtime():
    """Anywhere in its modules, inside functions too (its loading once went through torch's)."""
    root = Path(batchserve.runtimes.__file__).parent / "llama"
    imports = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imports += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                imports += [alias.name for alias in node.names]
    assert "batchserve.runtimes.bundled" in imports  # the scan sees function-level imports
    assert [name for name in imports if name.startswith("batchserve.runtimes.torch")] == []

"""The one cache writer (batchserve.cache.write_entry): an entry is whole or absent, whatever
happens to the writer, and concurrent writers end with one whole entry."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchserve.cache import write_entry

PARTS = ("weights", "config")


def complete(entry: Path) -> bool:
    return all((entry / part).is_file() for part in PARTS)


def build_as(writer: str):
    def build(scratch: Path) -> None:
        for part in PARTS:
            (scratch / part).write_text(writer)

    return build


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def test_an_entry_is_built_once_and_kept(tmp_path):
    target = tmp_path / "models" / "entry"  # the parent is made too
    assert write_entry(target, build_as("first"), complete) is True
    assert complete(target) and (target / "weights").read_text() == "first"

    def must_not_run(scratch: Path) -> None:
        raise AssertionError("a complete entry was built again")

    assert write_entry(target, must_not_run, complete) is False
    assert (target / "config").read_text() == "first"
    assert leftovers(target.parent) == []


def test_a_failed_build_leaves_no_entry_and_raises(tmp_path):
    target = tmp_path / "entry"

    def half_then_fail(scratch: Path) -> None:
        (scratch / "weights").write_text("half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        write_entry(target, half_then_fail, complete)
    assert not target.exists()
    assert leftovers(tmp_path) == []  # its scratch directory is gone too
    assert write_entry(target, build_as("again"), complete) is True


def test_a_stale_entry_is_replaced(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "weights").write_text("from an older format")  # no config: incomplete
    assert write_entry(target, build_as("new"), complete) is True
    assert [(target / part).read_text() for part in PARTS] == ["new", "new"]
    assert leftovers(tmp_path) == []


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path):
    target = tmp_path / "entry"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from batchserve.cache import write_entry

        def build(scratch):
            (scratch / "weights").write_text("half")
            print("writing", flush=True)
            time.sleep(60)

        write_entry(Path({str(target)!r}), build, lambda entry: (entry / "config").is_file())
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert not target.exists()  # only its hidden scratch directory is left
    assert all(name.startswith(".entry-") for name in leftovers(tmp_path))
    assert write_entry(target, build_as("next"), complete) is True  # the next writer is not in its way
    assert complete(target)


def _write_concurrently(target: str, writer: str, barrier, results) -> None:
    def build(scratch: Path) -> None:
        (scratch / "weights").write_text(writer)
        barrier.wait(timeout=30)  # every writer has half an entry before any finishes
        (scratch / "config").write_text(writer)

    results.put((writer, write_entry(Path(target), build, complete)))


def test_concurrent_writers_end_with_one_whole_entry(tmp_path):
    target = tmp_path / "entry"
    context = multiprocessing.get_context("fork")
    count = 4
    barrier, results = context.Barrier(count), context.Queue()
    writers = [
        context.Process(target=_write_concurrently, args=(str(target), f"writer-{index}", barrier, results))
        for index in range(count)
    ]
    for process in writers:
        process.start()
    try:
        outcomes = dict(results.get(timeout=60) for _ in writers)
    finally:
        for process in writers:
            process.join(timeout=30)
    assert [process.exitcode for process in writers] == [0] * count
    winners = [writer for writer, won in outcomes.items() if won]
    assert len(winners) == 1  # the others kept the first one's entry
    assert [(target / part).read_text() for part in PARTS] == winners * 2  # whole, and one writer's
    assert leftovers(tmp_path) == []

"""The docs agree with the code: generated option tables, links, the tests the guarantees name,
the library pages' examples, and benchmarks/RESULTS.md's one current section per benchmark."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from batchserve import clidoc
from tests.test_readme import ROOT, broken_links, readme_blocks, run_script

DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SETTINGS_PAGE = DOCS / "settings.md"


# --------------------------------------------------------------------------- option tables


def test_the_settings_page_tables_are_the_generated_ones():
    text = SETTINGS_PAGE.read_text()
    assert [match.group("command") for match in clidoc.MARKER.finditer(text)] == ["serve", "worker", "run-batch", "bench"]
    assert clidoc.stale_tables(text) == [], "run: python -m batchserve.clidoc docs/settings.md"


def test_every_option_is_in_its_table():
    """The options the hand-written tables had lost (issue 20) are there, as is every other."""
    text = SETTINGS_PAGE.read_text()
    tables = {match.group("command"): match.group("table") for match in clidoc.MARKER.finditer(text)}
    for flag in ("--drain-seconds", "--grace", "`--docs` / `--no-docs`"):
        assert flag in tables["serve"]
    for flag in ("--max-batch-tokens", "--runtime", "--quantize"):
        assert flag in tables["worker"]
    from typer.testing import CliRunner

    from batchserve.cli import app

    for command, table in tables.items():
        helptext = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        for flag in re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z][a-z-]+)", helptext):
            if flag != "--help":
                assert flag in table, f"{command} {flag} is missing from docs/settings.md"


def test_a_stale_table_is_found_and_rewritten():
    page = "intro\n<!-- options: worker -->\n| option | default | meaning |\n| --- | --- | --- |\n<!-- end options -->\nend\n"
    assert clidoc.stale_tables(page) == ["worker"]
    rendered = clidoc.render(page)
    assert clidoc.stale_tables(rendered) == []
    assert "`--visibility-timeout`" in rendered and rendered.startswith("intro\n") and rendered.endswith("end\n")


def test_defaults_come_from_the_settings():
    """A table's default is the field's: change the field and the table changes."""
    table = clidoc.options_table("serve")
    assert "| `--max-batch-size` | `64` |" in table
    assert "| `--backend thread\\|process\\|redis` | — |" in table
    assert "| `--docs` / `--no-docs` | `--docs` |" in table
    assert "| `--json` | off |" in clidoc.options_table("bench")
    assert clidoc.arguments("bench") == ["URL"]
    with pytest.raises(ValueError, match="no command"):
        clidoc.options_table("option")


def test_clidoc_check_exits_1_on_a_stale_page(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("<!-- options: bench -->\n<!-- end options -->\n")
    assert clidoc.main(["--check", str(page)]) == 1
    assert clidoc.main([str(page)]) == 0
    assert clidoc.main(["--check", str(page)]) == 0


# --------------------------------------------------------------------------- links and references


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")) + [RESULTS], ids=lambda page: page.name)
def test_links_resolve(page: Path):
    assert broken_links(page) == []


def test_every_docs_page_is_on_the_readme_map():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not in the README's map of the docs"


def test_the_guarantees_name_tests_that_exist():
    """Each `path.py::test_name` (under tests/) in the guarantees table is a test function there."""
    text = (DOCS / "guarantees.md").read_text()
    references = re.findall(r"`((?:[\w/]+/)?test_\w+\.py)(?:::(\w+))?`", text.split("## Benchmarks")[0])
    assert len(references) >= 20
    for path, name in references:
        source = ROOT / "tests" / path
        assert source.exists(), f"docs/guarantees.md names tests/{path}, which does not exist"
        if name:
            assert re.search(rf"def {name}\b", source.read_text()), f"tests/{path} has no {name}"


# --------------------------------------------------------------------------- examples


RUNNABLE_PAGES = ("library.md", "compat.md")


@pytest.mark.parametrize(
    "page, block",
    [
        (name, block)
        for name in RUNNABLE_PAGES
        for block in readme_blocks((DOCS / name).read_text())
        if block.lang == "python"
    ],
    ids=lambda value: value if isinstance(value, str) else f"line-{value.line}",
)
def test_the_library_pages_python_examples_run(page: str, block, tmp_path: Path):
    run_script(block, tmp_path)


# --------------------------------------------------------------------------- RESULTS.md


def _harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "harness.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_harness", module)
    spec.loader.exec_module(module)
    return module


def test_results_has_a_headline_first_and_one_section_per_benchmark():
    harness = _harness()
    text = RESULTS.read_text()
    sections = re.split(r"(?m)^(?=## )", text)[1:]
    keys = [harness.section_key(section) for section in sections]
    assert keys[0] == "Headline"
    assert len(keys) == len(set(keys)), f"a benchmark has two sections: {keys}"
    headline = sections[0]
    assert headline.count("\n|") >= len(keys) - 1, "a benchmark has no row in the headline table"


def test_a_rerun_replaces_its_section_and_a_new_one_is_added():
    harness = _harness()
    results = (
        "# Benchmark results\n\npreamble\n\n## Headline\n\n| a |\n\n"
        "## make bench — 2026-01-01 00:00 UTC\n\nold figures\n\n\n"
        "## Soak (`make soak`)\n\nsoak row\n"
    )
    rerun = harness.replace_section(results, "## make bench — 2026-02-02 00:00 UTC\n\nnew figures\n")
    assert "old figures" not in rerun and "new figures" in rerun
    assert rerun.index("new figures") < rerun.index("soak row"), "a replaced section keeps its place"
    assert harness.replace_section(rerun, "## Soak (`make soak`)\n\nnew soak row\n").count("## Soak") == 1
    added = harness.replace_section(rerun, "## Infill: 16 clients against one, /infill — 2026-02-02\n\nfills\n")
    assert added.endswith("soak row\n\n## Infill: 16 clients against one, /infill — 2026-02-02\n\nfills\n")
    assert harness.section_key("## Server overhead per request, zero-cost model (after: x) — 2026") == (
        "Server overhead per request, zero-cost model"
    )

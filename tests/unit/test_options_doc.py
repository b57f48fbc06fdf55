"""The options reference in docs/ is generated from the code and names only real options.

docs/options.md is `python -m pytest_tokperf options-doc`'s output; these tests fail when
it is stale, when an option pytest offers is missing from docs/, and when docs/ or the
README names an option or a TOKPERF_* variable the plugin does not have.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_tokperf import optionsdoc, settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FLAG = re.compile(r"--tokperf-[a-z0-9]+(?:-[a-z0-9]+)*")
VARIABLE = re.compile(r"\bTOKPERF_[A-Z0-9_]+")


def _pages() -> dict[str, str]:
    pages = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOCS.glob("*.md")}
    assert pages, f"no Markdown pages in {DOCS}"
    return pages


def test_options_page_is_generated_from_the_code() -> None:
    page = (DOCS / "options.md").read_text(encoding="utf-8")
    assert page == optionsdoc.markdown(), f"docs/options.md is stale: run `{optionsdoc.COMMAND}`"


def test_the_command_line_writes_the_page() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest_tokperf", "options-doc"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert out.stdout == (DOCS / "options.md").read_text(encoding="utf-8")


def test_every_option_pytest_offers_is_in_the_docs(pytester: pytest.Pytester) -> None:
    """The flags as `pytest --help` lists them, not as settings.OPTIONS says: an option
    added anywhere else must be documented too."""
    result = pytester.runpytest("--help")
    offered = set(FLAG.findall(result.stdout.str()))
    assert len(offered) >= len(settings.OPTIONS), sorted(offered)
    options_page = (DOCS / "options.md").read_text(encoding="utf-8")
    missing = sorted(f for f in offered if f"`{f}" not in options_page)
    assert not missing, f"not in docs/options.md: {missing}"


def test_the_docs_name_only_real_options_and_variables() -> None:
    real = {o.option for o in settings.OPTIONS}
    known = settings.known_environment()
    pages = _pages() | {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    wrong = sorted(
        f"{name}: {found}"
        for name, text in pages.items()
        for found in set(FLAG.findall(text)) - real | set(VARIABLE.findall(text)) - known
    )
    assert not wrong, f"the docs name options or variables the plugin does not have: {wrong}"


def test_each_option_row_has_its_names_and_help() -> None:
    rows = {line.split(" | ")[0]: line for line in optionsdoc.markdown().splitlines()}
    for o in settings.OPTIONS:
        flag = o.option if o.metavar is None else f"{o.option} {o.metavar}"
        row = rows[f"| `{flag}`"]
        assert f"`{o.name.upper()}`" in row and f"`{o.name}`" in row
        assert o.help.replace("|", "\\|") in row

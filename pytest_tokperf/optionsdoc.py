"""The options reference (docs/options.md), written from `settings.OPTIONS`.

`python -m pytest_tokperf options-doc > docs/options.md` regenerates the page;
`tests/unit/test_options_doc.py` fails when the page is stale or an option is missing.
"""

from __future__ import annotations

import tempfile

from pytest_tokperf import settings
from pytest_tokperf.engines.child import FAULT_ENV
from pytest_tokperf.engines.precision import ENV_CACHE
from pytest_tokperf.hardware.inventory import ENV_RECORDING
from pytest_tokperf.rack import ENV_RACK

COMMAND = "python -m pytest_tokperf options-doc > docs/options.md"

# environment variables that are no option: what each does (every one must be here)
HOOKS = {
    ENV_CACHE: "where the embedded engine's built precision variants go (default: the user "
    "cache directory, `~/.cache/pytest-tokperf` on Linux)",
    ENV_RACK: "`off` (or `0`, `false`, `no`) keeps tokperf out of an MPI world, for "
    "TensorRT-LLM's own multi-node mode, where pytest runs on rank 0 only",
    ENV_RECORDING: "replay a recorded NVML inventory (a JSON file) instead of the real NVML; "
    "this package's tests use it (format: `tests/data/nvml/`)",
    FAULT_ENV: "a test hook: `SIGSEGV@20` makes the first engine child of each engine send "
    "itself SIGSEGV after 20 tokens",
}

NOTES = """\
Precedence, everywhere: marker or `run()` argument > command line > environment > ini
> profile default. A bad value, an unknown profile or a malformed marker stops the run
with a usage error that names where the value came from and what is valid.

The flags (options without a value) read `true`/`false` (also `1`/`0`, `yes`/`no`)
from the environment and the ini file. An environment variable `TOKPERF_*` that the
plugin does not read (a typo) is a warning naming the closest known one.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The whole page, one row per option in the order `pytest --help` lists them."""
    lines = [
        "# Options",
        "",
        f"<!-- generated from settings.OPTIONS: `{COMMAND}`; do not edit by hand -->",
        "",
        f"Every option is a command-line flag, an environment variable and an ini key "
        f"({len(settings.OPTIONS)} options). This page is generated from the code "
        f"(`{COMMAND}`).",
        "",
        NOTES,
        "| option | env | ini | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for o in settings.OPTIONS:
        flag = o.option if o.metavar is None else f"{o.option} {o.metavar}"
        # the temporary directory differs between machines: the page names it as such
        default = "-" if o.default is None else _cell(o.default)
        default = default.replace(tempfile.gettempdir(), "<tmp>")
        lines.append(
            f"| `{flag}` | `{o.name.upper()}` | `{o.name}` | {default} | {_cell(o.help)} |"
        )
    hooks = sorted(settings.known_environment() - {o.name.upper() for o in settings.OPTIONS})
    lines += ["", "## Environment variables that are no option", ""]
    lines += ["| variable | what it does |", "|---|---|"]
    lines += [f"| `{name}` | {_cell(HOOKS[name])} |" for name in hooks]
    return "\n".join(lines) + "\n"

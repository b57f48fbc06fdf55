"""The engine accuracy parity compares with: a real reference, never the engine itself.

- `llamacpp`: the same GGUF model at the reference precision (built from it locally).
- `openai`: a second server, `--tokperf-reference-base-url` (and
  `--tokperf-reference-served-model`), or one launched with
  `--tokperf-reference-server-cmd`; never the server under test.
- `trtllm` and any other backend that loads a checkpoint: the profile's
  `reference_model`, the higher-precision checkpoint (FP8 or BF16 for an FP4 engine).

No reference configured is an error that says which option or profile key to set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_tokperf.accuracy import ParitySpec
from pytest_tokperf.profiles import Profile

# (option name, metavar, help); each also an environment variable and an ini option
OPTIONS = (
    (
        "tokperf_reference_base_url",
        "URL",
        "OpenAI-compatible server of the reference precision, for accuracy parity on the "
        "openai engine",
    ),
    (
        "tokperf_reference_served_model",
        "NAME",
        "model name on the reference server (default: the first it lists)",
    ),
    (
        "tokperf_reference_server_cmd",
        "CMD",
        "start this reference server ({port}: a free port) for accuracy parity on the "
        "openai engine, and stop it at the end",
    ),
)
IN_PROCESS = ("llamacpp",)  # backends that build the reference precision themselves


def _where(name: str) -> str:
    return f"--{name.replace('_', '-')} (env {name.upper()}, ini {name})"


class Missing(Exception):
    """No usable reference; the message says what to set."""


@dataclass(frozen=True)
class Plan:
    """How to load the reference: engine settings, and a server to launch first."""

    settings: dict[str, Any]
    server_cmd: str | None = None


def defaults(profile: Profile) -> ParitySpec:
    """The profile's `parity` table as the limits a parity test gets by default
    (MLPerf's 99%, or 99.9% in a high-accuracy profile)."""
    base = ParitySpec()
    table = profile.parity
    low, high = base.tokens_per_sample
    return ParitySpec(
        rouge_ratio=table.get("rouge_fraction", base.rouge_ratio),
        tokens_per_sample=(
            table.get("tokens_per_sample_low", low),
            table.get("tokens_per_sample_high", high),
        ),
    )


def _url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def plan(
    backend: str,
    test_settings: Mapping[str, Any],
    profile: Profile,
    at: str,
    lookup: Callable[[str], str | None],
    test_url: str | None = None,
) -> Plan:
    """The reference of the engine under test (`test_settings`) at precision `at`.

    `lookup(option)` gives an option's value (command line, env or ini), `test_url`
    the address the engine under test really uses (a launched server's).
    """
    settings = dict(test_settings)
    if backend in IN_PROCESS:
        return Plan({**settings, "precision": at})
    if backend == "openai":
        url = lookup("tokperf_reference_base_url")
        command = lookup("tokperf_reference_server_cmd")
        if not url and not command:
            raise Missing(
                f"accuracy parity on the openai engine needs a reference server at the "
                f"{at} precision: set {_where('tokperf_reference_base_url')} or "
                f"{_where('tokperf_reference_server_cmd')}; tokperf never compares a "
                "server with itself"
            )
        model = lookup("tokperf_reference_served_model")
        settings.pop("model", None)
        settings.update(precision=at, **({"model": model} if model else {}))
        if command:
            settings.pop("base_url", None)
            return Plan(settings, command)
        assert url is not None
        settings["base_url"] = url
        test_model = test_settings.get("model")
        if test_url and _url(url) == _url(test_url) and model in (None, test_model):
            raise Missing(
                f"the reference server {url} is the server under test; point "
                f"{_where('tokperf_reference_base_url')} at a server of the {at} precision "
                "(or name another model on it with --tokperf-reference-served-model)"
            )
        return Plan(settings)
    if backend == "sim":
        raise Missing("the sim engine has no model: accuracy parity needs a real engine")
    reference = profile.reference_model
    if reference is None:
        raise Missing(
            f"accuracy parity on the {backend} engine needs a reference checkpoint: set "
            f'reference_model = "PATH" (the higher-precision checkpoint, e.g. FP8 or BF16) '
            f"in profile {profile.name!r}, e.g. in pyproject.toml under "
            f'[tool.tokperf.profiles.NAME] with extends = "{profile.name}"'
        )
    if reference == settings.get("model"):
        raise Missing(
            f"profile {profile.name!r}: reference_model {reference!r} is the model under "
            "test; name the higher-precision checkpoint"
        )
    settings.pop("engine_dir", None)  # the test engine's build, not the reference's
    settings["model"] = reference
    return Plan(settings)

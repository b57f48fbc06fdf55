"""Every tokperf option, written once: flag, environment variable, ini key and help;
and `resolve`, which reads them all once into a frozen `Settings`.

Precedence, written down once: marker > command line > environment > ini > profile
default. Each parser below raises `pytest.UsageError` naming where the bad value
came from and what a good one looks like.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_tokperf import columns, hardware, profiles, rack, reference, workloads
from pytest_tokperf.baseline import MISSING_POLICIES
from pytest_tokperf.engines import BACKENDS, precision
from pytest_tokperf.regression import DEFAULT_TOLERANCE

INCONCLUSIVE_POLICIES = ("fail", "skip", "pass")
TABLE_MODES = ("auto", "wide")  # the terminal summary table: fitted (wide under -v), or whole
GROUP = ("tokperf", "LLM inference performance acceptance tests")


@dataclass(frozen=True)
class Option:
    """`--tokperf-x-y` / env `TOKPERF_X_Y` / ini `tokperf_x_y` (all from `name`)."""

    name: str  # the dest, e.g. "tokperf_json"
    metavar: str | None  # None: a flag (store_true)
    help: str
    default: str | None = None  # the default, as shown in the help
    flag: str | None = None  # the command-line flag when it is not --NAME

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("tokperf_profile", "NAME",
           f"hardware profile: {', '.join(sorted(profiles.BUILTIN))} or one of yours",
           f"{profiles.DEFAULT_PROFILE}, or detected from the GPUs"),
    Option("tokperf_json", "PATH",
           "write self-describing JSON results here (each test also to PATH.journal as it "
           "finishes)"),
    Option("tokperf_model_path", "PATH",
           "GGUF model for the embedded engine instead of the shipped SmolLM2-135M; "
           "transformers engine: a model folder, or a config JSON for random weights"),
    Option("tokperf_requests", "N", "requests per run when a test does not say",
           "the profile's"),
    Option("tokperf_max_tokens", "N",
           "max new tokens per request when neither the test nor the prompt says",
           "the profile's"),
    Option("tokperf_engine", "BACKEND",
           f"engine backend instead of the profile's: {', '.join(sorted(BACKENDS))}"),
    Option("tokperf_base_url", "URL",
           "OpenAI-compatible server for the openai engine, e.g. http://127.0.0.1:8000"),
    Option("tokperf_served_model", "NAME", "model name on that server", "the first it lists"),
    Option("tokperf_server_cmd", "CMD",
           "start this server for the session and stop it at the end, e.g. "
           "'trtllm-serve MODEL --tp_size 4'"),
    Option("tokperf_tokenizer", "PATH",
           "count the openai engine's output tokens with this GGUF file or tokenizer.json "
           "when the server sends no usage and has no tokenize endpoint"),
    Option("tokperf_client_procs", "N",
           "issue and stream from N client processes (openai engine), or 'auto' from the "
           "offered load", "1"),
    Option("tokperf_precision", "NAME",
           "precision of the engine under test; embedded engine: "
           f"{', '.join(precision.VARIANTS)}, built on first use into the cache",
           "the profile's"),
    Option("tokperf_gpus", "N", "GPUs to allocate to each process instead of the profile's"),
    Option("tokperf_allow_busy_gpus", None,
           "allocate GPUs that run other processes' compute work"),
    Option("tokperf_require_hardware", None,
           "error instead of skipping when the profile's GPUs (or its dataset) are missing "
           "or taken"),
    Option("tokperf_lock_dir", "DIR",
           "directory of the per-GPU lock files every tokperf process on this machine shares",
           str(hardware.DEFAULT_LOCK_DIR)),
    Option("tokperf_gpu_wait", "SECONDS",
           "wait up to this long for GPUs other processes hold before skipping", "0"),
    Option("tokperf_inconclusive", "POLICY",
           "what an INCONCLUSIVE verdict does to the test: fail, skip or pass", "fail"),
    Option("tokperf_min_duration", "SECONDS",
           "the least a run that judges floors or SLOs lasts: no early verdict before it, "
           "no PASS on a shorter run", "the profile's: 600 on the GPU profiles, 10 on cpu"),
    Option("tokperf_busy_machine", "POLICY",
           "a run on a machine whose other processes kept its cores busy: invalid (the "
           "default: its numbers are partly theirs) or note", "invalid"),
    Option("tokperf_confidence", "LEVEL",
           "confidence of the intervals, from 0.5 up to (not including) 1", "0.95"),
    Option("tokperf_records", "PATH",
           "append every measured request as a JSON line on a wall clock (under MPI each "
           "rank writes PATH.rankN)"),
    Option("tokperf_rack_timeout", "SECONDS",
           "how long MPI ranks wait for each other at each meeting",
           f"{rack.DEFAULT_TIMEOUT_S:g}"),
    *(Option(name, metavar, text) for name, metavar, text in reference.OPTIONS),
    Option("tokperf_dataset", "PATH",
           "JSONL workload a run without one measures, e.g. MLPerf's OpenOrca converted "
           "with `python -m pytest_tokperf convert-openorca`; the GPU profiles' floors "
           "need it"),
    Option("tokperf_save_baseline", "DIR", "store each perf test's result as a baseline in DIR"),
    Option("tokperf_baseline", "DIR", "compare each perf test with its baseline in DIR",
           flag="--tokperf-compare-baseline"),
    Option("tokperf_max_regression", "FRACTION",
           "allowed drop of tokens/s against the baseline (default: the profile's "
           f"max_regression, else {DEFAULT_TOLERANCE}; the cpu profile's is "
           f"{profiles.BUILTIN['cpu'].max_regression})"),
    Option("tokperf_baseline_missing", "POLICY",
           "with --tokperf-compare-baseline, what a test without a matching baseline is: "
           "fail, inconclusive or pass (pass: reported as not measured, never PASS)", "fail"),
    Option("tokperf_html", "PATH",
           "write a self-contained HTML report with figures here (figures need the `html` "
           "extra, matplotlib)"),
    Option("tokperf_table", "MODE",
           f"terminal summary table: auto (at most {columns.WIDTH} characters a line, every "
           "column and whole test ids under -v) or wide (always every column, whole test ids)",
           "auto"),
    Option("tokperf_history", "DIR",
           "append each perf test's result to the history in DIR; `python -m pytest_tokperf "
           "history DIR` finds its change points"),
)  # fmt: skip


def known_environment() -> set[str]:
    """Every TOKPERF_* variable the plugin reads: the options', and the hooks'."""
    from pytest_tokperf.engines.child import FAULT_ENV

    hooks = {hardware.ENV_RECORDING, precision.ENV_CACHE, profiles.ENV_PROFILE, rack.ENV_RACK}
    return {o.name.upper() for o in OPTIONS} | hooks | {FAULT_ENV}


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A warning per TOKPERF_* variable nothing reads (a typo is silently ignored
    otherwise), naming the closest known one."""
    known = known_environment()
    out = []
    for name in sorted(environ):
        if name.startswith("TOKPERF_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            out.append(f"tokperf: unknown environment variable {name} (ignored){hint}")
    return out


def add_options(parser: pytest.Parser) -> None:
    """Each option as a command-line flag and an ini key, with one help text."""
    group = parser.getgroup(*GROUP)
    for o in OPTIONS:
        where = f"env {o.name.upper()}, ini {o.name}"
        if o.default is not None:
            where += f"; default {o.default}"
        kind = {"action": "store_true"} if o.metavar is None else {"metavar": o.metavar}
        group.addoption(o.option, dest=o.name, help=f"{o.help} ({where})", **kind)
        parser.addini(o.name, o.help, default="")


def setting(config: pytest.Config, name: str) -> tuple[str, str] | None:
    """(value, where it came from) for option/env/ini `name`, or None when unset."""
    option = config.getoption(name)
    env = os.environ.get(name.upper())
    ini = config.getini(name)
    if option:
        flag = next((o.option for o in OPTIONS if o.name == name), "--" + name.replace("_", "-"))
        return option, flag
    if env:
        return env, f"environment variable {name.upper()}"
    if ini:
        return ini, f"ini option {name} in {config.inipath}"
    return None


def _number(
    config: pytest.Config,
    name: str,
    cast: Callable[[str], float],
    ok: Callable[[float], bool],
    wanted: str,
) -> float | None:
    """The setting `name` parsed with `cast` and checked with `ok` (None when unset); a
    UsageError naming its source and `wanted` otherwise."""
    found = setting(config, name)
    if found is None:
        return None
    value, source = found
    try:
        number = cast(value)
    except ValueError:
        number = None
    if number is None or number == float("inf") or not ok(number):
        raise pytest.UsageError(f"{source} must be {wanted}, got {value!r}")
    return number


def positive_int(config: pytest.Config, name: str) -> int | None:
    number = _number(config, name, int, lambda n: n >= 1, "a positive integer")
    return None if number is None else int(number)


FLAGS = {"1": True, "true": True, "yes": True, "on": True,
         "0": False, "false": False, "no": False, "off": False, "": False}  # fmt: skip


def flag(config: pytest.Config, name: str) -> bool:
    found = setting(config, name)
    if found is None:
        return False
    value, source = found
    if isinstance(value, bool):  # the command-line flag itself
        return value
    if value.strip().lower() not in FLAGS:
        raise pytest.UsageError(f"{source} must be true or false (1/0, yes/no), got {value!r}")
    return FLAGS[value.strip().lower()]


def client_procs(config: pytest.Config) -> int:
    """Client processes: N, or 0 for `auto` (decided per run from the offered load)."""
    found = setting(config, "tokperf_client_procs")
    if found is None:
        return 1
    if found[0] == "auto":
        return 0
    return positive_int(config, "tokperf_client_procs") or 1


def policy(
    config: pytest.Config, name: str, choices: tuple[str, ...] = INCONCLUSIVE_POLICIES
) -> str:
    """One of `choices` (the first when unset)."""
    found = setting(config, name)
    if found is None:
        return choices[0]
    value, source = found
    if value not in choices:
        raise pytest.UsageError(f"{source} must be one of {', '.join(choices)}, got {value!r}")
    return value


def seconds(config: pytest.Config, name: str, default: float = 0.0, zero: bool = True) -> float:
    """A number of seconds, >= 0 (`zero`: 0 allowed) or > 0."""
    least = "a number of seconds >= 0" if zero else "a positive number of seconds"
    number = _number(config, name, float, lambda n: n >= 0 if zero else n > 0, least)
    return default if number is None else number


def confidence(config: pytest.Config) -> float:
    wanted = "a number from 0.5 up to (not including) 1, such as 0.95"
    level = _number(config, "tokperf_confidence", float, lambda n: 0.5 <= n < 1, wanted)
    return 0.95 if level is None else level


def fraction(config: pytest.Config, name: str, default: float = DEFAULT_TOLERANCE) -> float:
    """A fraction from 0 up to (not including) 1, such as an allowed regression."""
    wanted = "a fraction from 0 up to 1, such as 0.05"
    number = _number(config, name, float, lambda n: 0 <= n < 1, wanted)
    return default if number is None else number


def _path(found: tuple[str, str] | None) -> Path | None:
    return Path(found[0]) if found else None


@dataclass(frozen=True)
class Settings:
    """A session's settings, resolved once at configure time (never for `--help`)."""

    registry: Mapping[str, profiles.Profile]
    profile: profiles.Profile  # with the requests, max_tokens and precision options applied
    profile_source: str
    unmatched: str | None  # GPUs no profile matches: why tests that use tokperf stop
    backend: str
    precisions: tuple[str, ...] | None  # what the backend can load (None: it decides itself)
    model_path: Path | None
    dataset: Path | None  # the workload a run without one measures (None: built-in prompts)
    dataset_missing: str | None  # the profile's dataset is missing: why its runs skip
    server_settings: Mapping[str, str]  # base_url, model, tokenizer (openai: precision)
    server_cmd: str | None
    gpu_count: int | None
    gpu_wait: float
    allow_busy: bool
    require_hardware: bool
    lock_dir: Path
    client_procs: int  # 0: auto
    inconclusive: str
    confidence: float
    rack_timeout: float
    json_path: Path | None
    records_path: Path | None
    html_path: Path | None
    history: Path | None
    table: str  # auto / wide: the terminal summary table fitted to the terminal, or whole
    save_baseline: Path | None
    compare_baseline: Path | None
    max_regression: float
    baseline_missing: str  # fail / inconclusive / pass: a compared test without a baseline
    busy_machine: str  # invalid / note: a run measured while others used the machine


def resolve(config: pytest.Config, inventory: hardware.Inventory) -> Settings:
    """Every option, each parsed once; without one, the profile is chosen for `inventory`."""
    ini_profile = config.getini("tokperf_profile")
    registry = profiles.load_user(config.rootpath)
    unmatched = None
    try:
        profile, profile_source = profiles.select(
            config.getoption("tokperf_profile"),
            ini_profile,
            str(config.inipath),
            registry,
            inventory,
        )
    except profiles.Unmatched as exc:
        unmatched = str(exc)
        profile, profile_source = registry["cpu"], "not used"
    chosen = profile_source != "default" and not profile_source.startswith("detected")
    broken = hardware.broken_driver(inventory)
    if broken is not None and not (chosen and profile.device_kind == "cpu"):
        unmatched = broken  # never the CPU (or a skip) in place of GPUs NVML cannot see
    gpu_wait = seconds(config, "tokperf_gpu_wait")
    gpu_count = positive_int(config, "tokperf_gpus")
    allow_busy = flag(config, "tokperf_allow_busy_gpus")
    require_hardware = flag(config, "tokperf_require_hardware")
    lock_dir = _path(setting(config, "tokperf_lock_dir")) or hardware.DEFAULT_LOCK_DIR
    requests = positive_int(config, "tokperf_requests")
    max_tokens = positive_int(config, "tokperf_max_tokens")
    profile = dataclasses.replace(
        profile,
        requests=requests or profile.requests,
        max_tokens=max_tokens or profile.max_tokens,
    )
    engine = setting(config, "tokperf_engine")
    backend = engine[0] if engine else profile.backend
    if backend not in BACKENDS:
        raise pytest.UsageError(
            f"unknown engine {backend!r} (from {engine[1] if engine else 'profile'}); "
            f"available: {', '.join(sorted(BACKENDS))}"
        )
    precisions = precision.VARIANTS if backend == "llamacpp" else None
    precision_setting = setting(config, "tokperf_precision")
    if precision_setting is not None:
        value, source = precision_setting
        if precisions is not None and value not in precisions:
            raise pytest.UsageError(
                f"{source}: unknown precision {value!r} for the {backend} "
                f"engine; available: {', '.join(precisions)}"
            )
        profile = dataclasses.replace(profile, precision=value)
    least = _number(config, "tokperf_min_duration", float, lambda n: n >= 0,
                    "a number of seconds >= 0")  # fmt: skip
    if least is not None:
        profile = dataclasses.replace(profile, min_duration_s=least)
    json_path = _path(setting(config, "tokperf_json"))
    model_path = None
    model = setting(config, "tokperf_model_path")
    if model is not None:
        model_path = Path(model[0])
        folder = backend == "transformers" and model_path.is_dir()
        if not (model_path.is_file() or folder):
            raise pytest.UsageError(
                f"model file {model[0]!r} (from {model[1]}) does not exist; "
                "give the path of a GGUF file (transformers: a model folder or config JSON)"
            )
    try:
        dataset, dataset_missing = workloads.profile_dataset(
            profile.name,
            profile.dataset,
            profile.defined_in,
            setting(config, "tokperf_dataset"),
        )
    except workloads.WorkloadError as exc:
        raise pytest.UsageError(str(exc)) from None
    server_settings = {
        key: value
        for key, name in (
            ("base_url", "tokperf_base_url"),
            ("model", "tokperf_served_model"),
            ("tokenizer", "tokperf_tokenizer"),
        )
        if (value := (setting(config, name) or ("", ""))[0])
    }
    if backend == "openai" and precision_setting is not None:
        server_settings["precision"] = precision_setting[0]  # a label: served as is
    server_cmd = setting(config, "tokperf_server_cmd")
    return Settings(  # the keywords below are parsed in this order, the errors too
        registry=registry,
        profile=profile,
        profile_source=profile_source,
        unmatched=unmatched,
        backend=backend,
        precisions=precisions,
        model_path=model_path,
        dataset=dataset,
        dataset_missing=dataset_missing,
        server_settings=server_settings,
        server_cmd=server_cmd[0] if server_cmd else None,
        gpu_count=gpu_count,
        gpu_wait=gpu_wait,
        allow_busy=allow_busy,
        require_hardware=require_hardware,
        lock_dir=lock_dir,
        client_procs=client_procs(config),
        inconclusive=policy(config, "tokperf_inconclusive"),
        confidence=confidence(config),
        rack_timeout=seconds(config, "tokperf_rack_timeout", rack.DEFAULT_TIMEOUT_S, zero=False),
        json_path=json_path,
        records_path=_path(setting(config, "tokperf_records")),
        html_path=_path(setting(config, "tokperf_html")),
        history=_path(setting(config, "tokperf_history")),
        table=policy(config, "tokperf_table", TABLE_MODES),
        save_baseline=_path(setting(config, "tokperf_save_baseline")),
        compare_baseline=_path(setting(config, "tokperf_baseline")),
        max_regression=fraction(
            config, "tokperf_max_regression", profile.max_regression or DEFAULT_TOLERANCE
        ),
        baseline_missing=policy(config, "tokperf_baseline_missing", MISSING_POLICIES),
        busy_machine=policy(config, "tokperf_busy_machine", ("invalid", "note")),
    )

"""The simulated engine: token timings drawn from distributions you set, seeded.

It implements the same protocol as the real backends, so a pipeline (markers, CI
jobs, reports) can be dry-run without a model, and the verdict's statistics can be
measured against a known true throughput (benchmarks/verdict_quality.py).

Timing model, per request (all in simulated seconds, divided by `time_scale` before
sleeping): wait for one of `slots` serving slots (first come, first served), then
the first token after `ttft_s` (gamma distributed, coefficient of variation
`jitter`), then each further token after a gap of mean 1 / `tokens_per_s` (same
jitter), plus with probability `stall_prob` per token a stall of `stall_s`. With
probability `fail_prob` a request fails half-way. With `slow_factor` < 1 the engine
alternates fast and slow phases (thermal or power throttling, a noisy neighbour),
starting fast at its first request, each lasting an exponential time of mean
`phase_s` simulated seconds (seeded by `seed`); in a slow phase every gap is divided
by `slow_factor`. With `throttle_factor` other than 1, the engine's speed changes for
good `throttle_after_s` simulated seconds after its first request: 0.6 is a GPU that
heats up and throttles, 2 an engine that warms up (slow first). Phases and throttle
belong to the engine, shared by all its requests. With `prefill_s_per_token` the mean
TTFT grows by that much per prompt token (the sim counts whitespace-separated words).
Each request draws from its own generator seeded by (`seed`, request id), so a run
is reproducible whatever the interleaving. Chunks are released at absolute target
times, so the event loop's own overhead does not accumulate into the simulated rate.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, Request

DEFAULTS: dict[str, float] = {
    "tokens_per_s": 100.0,  # per request, once its first token is out
    "ttft_s": 0.05,
    "jitter": 0.2,  # coefficient of variation of every gap (0: fixed gaps)
    "stall_prob": 0.0,
    "stall_s": 0.5,
    "fail_prob": 0.0,
    "slots": 1,  # requests served at once; more wait (1: like the embedded engine)
    "output_tokens": 0,  # tokens per request; 0: the request's max_tokens
    "chunk_tokens": 1,  # tokens per streamed chunk
    "time_scale": 1.0,  # simulated seconds per wall second (10: runs 10x faster)
    "seed": 0,
    "devices": 1,
    "slow_factor": 1.0,  # speed in a slow phase (1: no phases)
    "phase_s": 0.0,  # mean phase length, simulated seconds (needed when slow_factor < 1)
    "max_model_len": 131_072,  # a longer answer fails, as a real server rejects it
    "throttle_after_s": 0.0,  # simulated seconds after the first request ...
    "throttle_factor": 1.0,  # ... from which the engine runs at this speed (1: never)
    "prefill_s_per_token": 0.0,  # TTFT grows by this per prompt token (a whitespace word)
}
POSITIVE = ("tokens_per_s", "time_scale", "slots", "chunk_tokens", "devices", "slow_factor",
            "max_model_len", "throttle_factor")  # fmt: skip
PROBABILITIES = ("stall_prob", "fail_prob")
INTEGERS = ("slots", "output_tokens", "chunk_tokens", "seed", "devices", "max_model_len")


class SimError(RuntimeError):
    """The failure a simulated request reports."""


def parse_settings(settings: Mapping[str, Any]) -> dict[str, float]:
    """Defaults overlaid with `settings`, each checked; the error says which and why."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise EngineError(
            f"unknown sim engine settings {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}"
        )
    out = dict(DEFAULTS)
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EngineError(f"sim engine setting {key}: expected a number, got {value!r}")
        if key in INTEGERS and value != int(value):
            raise EngineError(f"sim engine setting {key}: expected an integer, got {value!r}")
        if value < 0 or (key in POSITIVE and value == 0):
            raise EngineError(f"sim engine setting {key}: out of range, got {value!r}")
        if key in PROBABILITIES and value > 1:
            raise EngineError(f"sim engine setting {key}: a probability is at most 1")
        out[key] = float(value)
    if out["slow_factor"] > 1:
        raise EngineError("sim engine setting slow_factor: a slow phase's speed is at most 1")
    if out["slow_factor"] < 1 and out["phase_s"] <= 0:
        raise EngineError("sim engine setting slow_factor < 1 needs phase_s > 0 (mean seconds)")
    return out


def _gap(rng: random.Random, mean: float, cv: float) -> float:
    """A gamma-distributed gap with this mean and coefficient of variation."""
    if cv <= 0 or mean <= 0:
        return mean
    shape = 1 / cv**2
    return rng.gammavariate(shape, mean / shape)


def request_timeline(settings: Mapping[str, float], request: Request) -> tuple[list[float], bool]:
    """Simulated seconds from service start to each token, and whether the request fails.

    Pure and seeded: the benchmark derives the true throughput from the same model.
    """
    s = settings
    rng = random.Random(f"{int(s['seed'])}:{request.id}")
    count = int(s["output_tokens"]) or request.max_tokens
    fails = rng.random() < s["fail_prob"]
    prefill = s["prefill_s_per_token"] * len(request.prompt.split())
    at = _gap(rng, s["ttft_s"] + prefill, s["jitter"])
    times = [at]
    for _ in range(count - 1):
        at += _gap(rng, 1 / s["tokens_per_s"], s["jitter"])
        if s["stall_prob"] and rng.random() < s["stall_prob"]:
            at += s["stall_s"]
        times.append(at)
    return times, fails


def mean_request_s(settings: Mapping[str, float], tokens: int) -> float:
    """Expected simulated service time of a request of `tokens` tokens (no queueing)."""
    s = settings
    return (
        s["ttft_s"]
        + (tokens - 1) / s["tokens_per_s"]
        + (tokens - 1) * s["stall_prob"] * s["stall_s"]
    )


class Phases:
    """The engine's speed over simulated time since its first request: 1 in a fast
    phase, `slow_factor` in a slow one, times `throttle_factor` from `throttle_after_s`
    on; phases alternate, starting fast, with exponential lengths of mean `phase_s`.
    Work (simulated seconds of the timing model at full speed) maps to time through the
    speed: `after(t, w)` is when `w` seconds of work started at `t` are done."""

    def __init__(
        self,
        slow_factor: float,
        phase_s: float,
        seed: int,
        throttle_after_s: float = 0.0,
        throttle_factor: float = 1.0,
    ) -> None:
        self.slow = slow_factor
        self.mean = phase_s
        self.rng = random.Random(f"{seed}:phases")
        self.throttle_at = throttle_after_s if throttle_factor != 1 else math.inf
        self.throttle = throttle_factor
        self.phase = 0  # even phases are fast
        self.switch = self.rng.expovariate(1 / phase_s) if slow_factor < 1 else math.inf
        # piecewise constant speed: segment i runs from starts[i] with speeds[i], work
        # done by its start works[i]; segments end at phase switches and the throttle
        self.starts = [0.0]
        self.works = [0.0]
        self.speeds = [self._speed(0.0)]

    def _speed(self, t: float) -> float:
        base = 1.0 if self.phase % 2 == 0 else self.slow
        return base * (self.throttle if t >= self.throttle_at else 1.0)

    def _grow(self) -> bool:
        """Add the next segment; False when the last one lasts for ever."""
        t = self.starts[-1]
        end = min(self.switch, self.throttle_at if self.throttle_at > t else math.inf)
        if math.isinf(end):
            return False
        self.works.append(self.works[-1] + (end - t) * self.speeds[-1])
        self.starts.append(end)
        if end == self.switch:
            self.phase += 1
            self.switch = end + self.rng.expovariate(1 / self.mean)
        self.speeds.append(self._speed(end))
        return True

    def work_at(self, t: float) -> float:
        while self.starts[-1] <= t and self._grow():
            pass
        i = bisect.bisect_right(self.starts, t) - 1
        return self.works[i] + (t - self.starts[i]) * self.speeds[i]

    def time_at(self, work: float) -> float:
        while self.works[-1] <= work and self._grow():
            pass
        i = bisect.bisect_right(self.works, work) - 1
        return self.starts[i] + (work - self.works[i]) / self.speeds[i]

    def after(self, t: float, work: float) -> float:
        if self.slow == 1 and math.isinf(self.throttle_at):
            return t + work
        return self.time_at(self.work_at(t) + work)


def mean_speed(settings: Mapping[str, float]) -> float:
    """The long-run share of full speed: fast and slow phases last equally long on average."""
    return (1 + settings["slow_factor"]) / 2


class SimEngine:
    def __init__(self, settings: Mapping[str, float]) -> None:
        self.settings = dict(settings)
        self.info = EngineInfo(
            backend="sim",
            model="sim",
            precision="none",
            devices=int(settings["devices"]),
            versions={},
            settings=dict(settings),
        )
        # asyncio primitives belong to one event loop; each tokperf run has its own
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self.phases = Phases(
            settings["slow_factor"],
            settings["phase_s"],
            int(settings["seed"]),
            settings["throttle_after_s"],
            settings["throttle_factor"],
        )
        self._t0: float | None = None  # wall time of the first request: the phases' origin

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(int(self.settings["slots"])))
        return self._slots[1]

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        count = int(self.settings["output_tokens"]) or request.max_tokens
        if count > self.settings["max_model_len"]:
            limit = int(self.settings["max_model_len"])
            raise SimError(f"{count} tokens asked, more than max_model_len {limit}")
        times, fails = request_timeline(self.settings, request)
        scale = self.settings["time_scale"]
        per_chunk = int(self.settings["chunk_tokens"])
        async with self._semaphore():
            start = time.perf_counter()
            if self._t0 is None:
                self._t0 = start
            begun = (start - self._t0) * scale  # simulated seconds since the first request
            for i in range(0, len(times), per_chunk):
                if fails and i >= len(times) // 2:
                    raise SimError(f"simulated failure after {i} tokens")
                last = times[min(i + per_chunk, len(times)) - 1]
                at = self._t0 + self.phases.after(begun, last) / scale
                delay = at - time.perf_counter()
                await asyncio.sleep(max(0.0, delay))
                n = min(per_chunk, len(times) - i)
                yield Chunk(n, " tok" * n)

    async def aclose(self) -> None:
        pass


def load(settings: Mapping[str, Any], devices: int) -> SimEngine:
    """`devices` from the profile, unless the settings name their own."""
    merged = {"devices": devices, **settings}
    return SimEngine(parse_settings(merged))

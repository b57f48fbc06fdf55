"""Timed traces: read a Mooncake JSONL or BurstGPT CSV trace, and make its requests.

A trace says when each request arrived and how long its input and output were, not
what it said. The prompts are synthesized: every 512-token block of a Mooncake
request's input is text made from its `hash_ids` entry, so requests that share hash
ids share the same prefix text (a prefix cache can hit on it), and every block is
words that are one token each, so an engine's tokenizer reads exactly the traced
input length (the chat template's own tokens aside). `max_tokens` is the traced
output length; the request asks the engine to ignore EOS (`Request.ignore_eos`)
where the backend can.

Formats (public):
- Mooncake (kvcache-ai/Mooncake, `mooncake_trace.jsonl`; AIPerf's trace replay reads
  the same): one JSON object a line, `timestamp` (ms since the first request),
  `input_length`, `output_length`, `hash_ids` (ids of 512-token prefix blocks).
- BurstGPT (HPMLL/BurstGPT, `data/BurstGPT_*.csv`): columns `Timestamp` (seconds),
  `Model`, `Request tokens`, `Response tokens`, `Total tokens`, `Log Type`. It has no
  block ids: every prompt is its own. Rows with 0 response tokens (failures in the
  trace) are skipped.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_tokperf.engines import Request
from pytest_tokperf.workloads import json_lines

BLOCK_TOKENS = 512  # Mooncake's block size: one hash id per 512 input tokens
NS = 1_000_000_000
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")

# Words that are one token each after a space in GPT-2-style byte-level BPE
# vocabularies (SmolLM2's, Llama 3's, ...): checked against the engine's tokenizer
# when it has one (`one_token_words`), assumed when it has none.
_VOCABULARY = """
the of and to in is was for on as with by at from that this which are be or an it not
his but had have has were all their one new first can more also other after time two
may its into only over most some such used when would them than then made any many
these three each where well up out about between year him world during under both her
state city part work later known since school people number could while being before
high day same through music own film back called name four water south north east west
game small large end life long group area line house road book war early family last
five set power system air light river point team place form left right field hand land
"""
WORDS = tuple(_VOCABULARY.split())


class TraceError(ValueError):
    """A trace could not be read; the message names the file and line."""


@dataclass(frozen=True)
class Entry:
    """One request of a trace: arrival (seconds after the trace's first), lengths, blocks."""

    at_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class Trace:
    name: str
    entries: tuple[Entry, ...]

    def window(self, speed: float = 1.0, window: tuple[float, float] | None = None) -> Trace:
        """The entries inside `window` (start_s, end_s of trace time, end excluded),
        their times taken from the window's start and divided by `speed`."""
        start, end = window if window is not None else (0.0, math.inf)
        kept = [e for e in self.entries if start <= e.at_s < end]
        if not kept:
            raise TraceError(
                f"{self.name}: no request in trace_window=({start:g}, {end:g}) seconds; the "
                f"trace spans 0 to {self.entries[-1].at_s:g} s"
            )
        origin = start if window is not None else 0.0
        return Trace(
            self.name,
            tuple(
                Entry((e.at_s - origin) / speed, e.input_length, e.output_length,
                      e.hash_ids, e.line)
                for e in kept
            ),
        )  # fmt: skip

    def offsets_ns(self) -> tuple[int, ...]:
        """Each request's issue time after the run's start, nanoseconds."""
        return tuple(round(e.at_s * NS) for e in self.entries)


def _positive_int(obj: dict[str, object], key: str, where: str, least: int = 1) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise TraceError(f"{where}: {key!r} must be an integer >= {least}, got {value!r}")
    return value


def parse_mooncake(text: str, source: str) -> Trace:
    entries: list[Entry] = []
    for number, where, obj in json_lines(text, source, TraceError):
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in obj]
        if missing:
            raise TraceError(
                f"{where}: missing {', '.join(missing)}; a Mooncake trace line has "
                f"{', '.join(MOONCAKE_KEYS)} (hash_ids optional)"
            )
        at = obj["timestamp"]
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not at >= 0:
            raise TraceError(f"{where}: 'timestamp' must be ms >= 0, got {at!r}")
        hash_ids = obj.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
        ):
            raise TraceError(f"{where}: 'hash_ids' must be a list of integers")
        entries.append(
            Entry(
                float(at) / 1000,
                _positive_int(obj, "input_length", where),
                _positive_int(obj, "output_length", where),
                tuple(hash_ids),
                number,
            )
        )
    return _ordered(entries, source)


def parse_burstgpt(text: str, source: str) -> Trace:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in BURSTGPT_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise TraceError(
            f"{source}: missing column {', '.join(missing)}; a BurstGPT CSV has the columns "
            "Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type"
        )
    entries: list[Entry] = []
    first: float | None = None
    for number, row in enumerate(reader, start=2):
        where = f"{source}:{number}"
        try:
            at = float(row["Timestamp"])
            prompt, answer = int(row["Request tokens"]), int(row["Response tokens"])
        except (TypeError, ValueError):
            raise TraceError(
                f"{where}: Timestamp must be a number and the token counts integers, got "
                f"{row['Timestamp']!r}, {row['Request tokens']!r}, {row['Response tokens']!r}"
            ) from None
        if not math.isfinite(at) or at < 0 or prompt < 1 or answer < 0:
            raise TraceError(f"{where}: out of range (Timestamp {at}, tokens {prompt}, {answer})")
        if answer == 0:  # a request that failed in the traced service
            continue
        first = at if first is None else first
        entries.append(Entry(at - first, prompt, answer, (), number))
    return _ordered(entries, source)


def _ordered(entries: list[Entry], source: str) -> Trace:
    if not entries:
        raise TraceError(f"{source}: no requests")
    for before, after in itertools.pairwise(entries):
        if after.at_s < before.at_s:
            raise TraceError(
                f"{source}:{after.line}: timestamp {after.at_s:g} s is before the previous "
                f"line's {before.at_s:g} s; a trace lists requests in arrival order"
            )
    origin = entries[0].at_s
    return Trace(source, tuple(Entry(e.at_s - origin, e.input_length, e.output_length,
                                     e.hash_ids, e.line) for e in entries))  # fmt: skip


def is_trace(path: str | Path) -> bool:
    """A file the trace scenario reads: a Mooncake .jsonl or a BurstGPT .csv."""
    return Path(path).suffix.lower() in (".jsonl", ".csv")


def load(path: str | Path) -> Trace:
    """A Mooncake trace (.jsonl) or a BurstGPT trace (.csv), by the file's suffix."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace {str(path)!r} is not a file (a Mooncake .jsonl or BurstGPT .csv)")
    try:
        text = p.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if p.suffix.lower() == ".csv":
        return parse_burstgpt(text, str(p))
    if p.suffix.lower() == ".jsonl":
        return parse_mooncake(text, str(p))
    raise TraceError(f"trace {str(path)!r}: expected a Mooncake .jsonl or a BurstGPT .csv")


def one_token_words(count: Callable[[str], int] | None) -> tuple[str, ...]:
    """The words each read as one token after a space by `count` (a tokenizer's token
    count of a text, no special tokens); all of `WORDS` when there is no tokenizer."""
    if count is None:
        return WORDS
    words = tuple(w for w in WORDS if count(" " + w) == 1)
    if len(words) < 16:
        raise TraceError(
            f"the engine's tokenizer reads only {len(words)} of the trace vocabulary's words "
            "as one token; the trace's input lengths cannot be synthesized exactly"
        )
    return words


def prompts(trace: Trace, words: Sequence[str] = WORDS, block: int = BLOCK_TOKENS) -> list[str]:
    """Each entry's prompt: `input_length` one-token words. Block i (of `block` tokens)
    is the text of `hash_ids[i]`, the same in every request naming it (a shorter last
    block is the start of its text); tokens past the hash ids are the request's own."""
    out = []
    for index, e in enumerate(trace.entries):
        parts = []
        for i in range(0, e.input_length, block):
            size = min(block, e.input_length - i)
            n = i // block
            seed = f"block:{e.hash_ids[n]}" if n < len(e.hash_ids) else f"own:{index}:{n}"
            parts.append(words_text(seed, size, words))
        out.append("".join(parts))
    return out


def words_text(seed: str, size: int, words: Sequence[str] = WORDS) -> str:
    """`size` words, each after a space, drawn from `words` by a generator seeded by
    `seed`: the first k words of a seed's text are the same for every size >= k."""
    rng = random.Random(seed)
    return "".join(" " + rng.choice(words) for _ in range(size))


def requests(trace: Trace, words: Sequence[str] = WORDS) -> list[Request]:
    """The trace's requests, in arrival order: synthesized prompts, `max_tokens` the
    traced output length, EOS ignored where the engine can."""
    return [
        Request(id=f"trace-{i}", prompt=text, max_tokens=e.output_length, detokenize=False,
                ignore_eos=True)
        for i, (e, text) in enumerate(zip(trace.entries, prompts(trace, words), strict=True))
    ]  # fmt: skip


def engine_words(engine: object) -> tuple[str, ...]:
    """The one-token words by the engine's own tokenizer, where it has one (the embedded
    engine's `prompt_tokens`: the chat template's tokens are taken off); else WORDS."""
    tokens = getattr(engine, "prompt_tokens", None)
    if tokens is None:
        return WORDS
    empty = len(tokens(""))
    return one_token_words(lambda text: len(tokens(text)) - empty)


def checked(
    workload: object,
    speed: object,
    window: object,
    *,
    requests: int | None,
    max_tokens: int | None,
    bounds: tuple[float | None, float | None],
) -> Trace:
    """The trace a `tokperf.run(scenario="trace", ...)` replays, its arguments checked."""
    call = "tokperf.run(scenario='trace'"
    if not isinstance(workload, (str, Path)) or not is_trace(workload):
        raise ValueError(
            f"{call}) needs workload=<a Mooncake .jsonl or BurstGPT .csv trace>, got {workload!r}"
        )
    if requests is not None or max_tokens is not None:
        raise ValueError(
            f"{call}) issues the trace's own requests with their traced output lengths; drop "
            "requests= and max_tokens= (cut the trace with trace_window=(start_s, end_s))"
        )
    if any(b is not None for b in bounds):
        raise ValueError(f"{call}) lasts as long as its trace; use trace_window=, not durations")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not (0 < speed < math.inf):
        raise ValueError(f"{call}, trace_speed={speed!r}): expected a positive number")
    if window is not None and not (
        isinstance(window, tuple)
        and len(window) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
        and 0 <= window[0] < window[1]
    ):
        raise ValueError(
            f"{call}, trace_window={window!r}): expected (start_s, end_s) seconds of trace "
            "time, 0 <= start_s < end_s"
        )
    return load(workload).window(float(speed), window)

"""The prefix cache: flush it, prime it, read its hit rate, and refuse a run whose hit
rate is outside the band the test meant (`tokperf.run(..., cache_hit_rate=(lo, hi))`).

Hit rate = prompt tokens served from the cache / prompt tokens asked, over one run:
- the embedded engine (llama.cpp, setting `prefix_cache = true`) counts them itself
  (`cache_counters`: the prefix llama-cpp-python reuses of each prompt);
- vLLM: the counters `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`
  (tokens), their change between the run's first and last `/metrics` scrape;
- SGLang: its gauge `sglang:cache_hit_rate` at the run's end (SGLang computes it over
  its recent batches; it exposes no cumulative counter pair in its documented page).
Flush: the embedded engine resets its KV cache and saved states; vLLM
`POST /reset_prefix_cache`, SGLang `POST /flush_cache`; another engine says it cannot.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

FLUSH_PATHS = {"vllm": "/reset_prefix_cache", "sglang": "/flush_cache"}


class CacheError(RuntimeError):
    """The cache could not be flushed or read; the message says why and what to do."""


@runtime_checkable
class CachingEngine(Protocol):
    """An engine that keeps a prefix cache of its own and counts its hits."""

    def flush_cache(self) -> None: ...

    def cache_counters(self) -> tuple[int, int]:
        """(prompt tokens served from the cache, prompt tokens asked) since the start."""
        ...


def counters_rate(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Hits / queries between two readings of (hits, queries); None with no queries."""
    hits, queries = after[0] - before[0], after[1] - before[1]
    return hits / queries if queries > 0 else None


def page_rate(first: Mapping[str, float], last: Mapping[str, float]) -> float | None:
    """The hit rate over a run from two parsed `/metrics` pages (server_metrics.parse)."""
    hits, queries = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
    if all(k in first and k in last for k in (hits, queries)):
        return counters_rate(
            (int(first[hits]), int(first[queries])), (int(last[hits]), int(last[queries]))
        )
    return last.get("sglang:cache_hit_rate")


def check_band(band: object) -> tuple[float, float] | None:
    """`cache_hit_rate=(lo, hi)`, 0 <= lo <= hi <= 1, or None; ValueError otherwise."""
    if band is None:
        return None
    ok = (
        isinstance(band, tuple)
        and len(band) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in band)
        and 0 <= band[0] <= band[1] <= 1
    )
    if not ok:
        raise ValueError(
            f"tokperf.run(cache_hit_rate={band!r}): expected (low, high) shares, "
            "0 <= low <= high <= 1, e.g. (0.9, 1.0)"
        )
    assert isinstance(band, tuple)
    return float(band[0]), float(band[1])


def band_reason(cache: Mapping[str, Any] | None) -> str | None:
    """The INVALID reason when the run's hit rate is outside its band, or unknown."""
    if not cache or cache.get("band") is None:
        return None
    low, high = cache["band"]
    rate = cache.get("hit_rate")
    if rate is None:
        return (
            f"the run asked for a prefix-cache hit rate in [{low:.2f}, {high:.2f}] but none "
            f"was measured ({cache.get('source', 'no cache counters')})"
        )
    if low <= rate <= high:
        return None
    return (
        f"prefix-cache hit rate {rate:.3f} is outside the band the test asked for "
        f"[{low:.2f}, {high:.2f}] ({cache.get('source')}): the cache was not in the state "
        "the test meant (flushed, or primed with tokperf_cache.prime)"
    )


def flush_url(base_url: str, server: str | None) -> str:
    if server not in FLUSH_PATHS:
        raise CacheError(
            f"cannot flush the prefix cache of the server at {base_url} ({server or 'unknown'}"
            "): flush is known for vLLM (POST /reset_prefix_cache) and SGLang "
            "(POST /flush_cache)"
        )
    return base_url.rstrip("/").removesuffix("/v1") + FLUSH_PATHS[server]


def post(url: str, timeout_s: float = 30.0) -> None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as exc:
        raise CacheError(f"POST {url} failed: {exc}") from None


def _engine_counters(engine: object) -> tuple[int, int] | None:
    if not isinstance(engine, CachingEngine):
        return None
    try:
        return engine.cache_counters()
    except Exception:  # an engine whose cache is off: no counters, said by `source`
        return None


class Counters:
    """An engine's cache counters at the start of a run; `summary` at its end gives the
    run's hit rate (the server's pages, when the engine keeps no counters itself)."""

    def __init__(self, engine: object) -> None:
        self.engine = engine
        self.start = _engine_counters(engine)

    def summary(
        self,
        pages: Sequence[tuple[float, Mapping[str, float]]],
        band: tuple[float, float] | None,
    ) -> dict[str, Any] | None:
        """The run's cache block: None when nothing was measured and no band was asked."""
        out: dict[str, Any] = {"band": band, "hit_rate": None}
        end = _engine_counters(self.engine) if self.start is not None else None
        if self.start is not None and end is not None:
            out.update(
                hit_rate=counters_rate(self.start, end),
                hits=end[0] - self.start[0],
                queries=end[1] - self.start[1],
                source="the engine's own counters (prompt tokens reused / asked)",
            )
        elif len(pages) >= 2 and (rate := page_rate(pages[0][1], pages[-1][1])) is not None:
            out.update(hit_rate=rate, source="the server's /metrics")
        elif band is None:
            return None
        else:
            out["source"] = (
                "the engine keeps no cache counters and its server's /metrics has none "
                "(embedded engine: set prefix_cache = true; vLLM and SGLang expose them)"
            )
        return out


class Cache:
    """The `tokperf_cache` fixture: flush the engine's prefix cache, prime it with a
    workload, read the hit rate since the last flush or prime."""

    def __init__(self, engine: Any, prime: Callable[[Sequence[str]], None]) -> None:
        self.engine = engine
        self._prime = prime  # runs prompts through the engine, unmeasured
        self._mark: tuple[int, int] | Mapping[str, float] | None = None
        self.mark()

    def _base_url(self) -> str | None:
        info = self.engine.info
        base = info.settings.get("base_url") if info.backend == "openai" else None
        return str(base) if base else None

    def _page(self) -> Mapping[str, float] | None:
        from pytest_tokperf import server_metrics

        base = self._base_url()
        if base is None:
            return None
        try:
            return server_metrics.scrape(base.rstrip("/").removesuffix("/v1") + "/metrics")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CacheError(f"cannot read {base}/metrics: {exc}") from None

    def mark(self) -> None:
        """Hit rates from here on."""
        counters = _engine_counters(self.engine)
        try:
            self._mark = counters if counters is not None else self._page()
        except CacheError:  # no /metrics: hit_rate() says so when asked
            self._mark = None

    def flush(self) -> None:
        """Empty the prefix cache, so the next request finds nothing cached."""
        if isinstance(self.engine, CachingEngine):
            self.engine.flush_cache()
        elif (base := self._base_url()) is not None:
            from pytest_tokperf import server_metrics

            page = self._page()
            post(flush_url(base, server_metrics.identify(page or {})))
        else:
            raise CacheError(
                f"the {self.engine.info.backend} engine cannot flush a prefix cache here "
                "(embedded engine with prefix_cache = true, or a vLLM / SGLang server)"
            )
        self.mark()

    def prime(self, workload: Any) -> None:
        """Send every prompt of `workload` once (unmeasured), so their prefixes are cached."""
        from pytest_tokperf import workloads

        self._prime([p.prompt for p in workloads.load(workload).prompts])
        self.mark()

    def hit_rate(self) -> float | None:
        """Prompt tokens served from the cache / asked since the last flush or prime."""
        mark = self._mark
        if isinstance(mark, tuple):
            now = _engine_counters(self.engine)
            return None if now is None else counters_rate(mark, now)
        page = self._page()
        return None if mark is None or page is None else page_rate(mark, page)

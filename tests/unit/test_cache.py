"""Prefix-cache hit rates from recorded /metrics pages, the band check, shared_prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_tokperf import cache, profiles, server_metrics, workloads
from pytest_tokperf.engines import load_engine
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.verdict import run_validity

PAGES = Path(__file__).parent.parent / "data" / "metrics"


def later(text: str, series: str, value: float) -> str:
    """The recorded page as a later scrape shows it: `series` now at `value`."""
    out, n = re.subn(rf"^({re.escape(series)}\{{[^}}]*\}}) \S+$", rf"\g<1> {value}", text,
                     flags=re.M)  # fmt: skip
    assert n == 1
    return out


def test_vllm_hit_rate_is_the_change_in_its_counters() -> None:
    first = (PAGES / "vllm.prom").read_text()
    # the page says hits 1024 of 4096 queried tokens; a run adds 3000 hits of 4000
    last = later(first, "vllm:prefix_cache_hits_total", 4024.0)
    last = later(last, "vllm:prefix_cache_queries_total", 8096.0)
    a, b = server_metrics.parse(first), server_metrics.parse(last)
    assert cache.page_rate(a, b) == 3000 / 4000
    assert cache.page_rate(a, a) is None  # no queries in between: no rate, not 0


def test_sglang_hit_rate_is_its_gauge() -> None:
    page = server_metrics.parse((PAGES / "sglang.prom").read_text())
    # the documented page's `sglang:cache_hit_rate{...} 0.007507552643049313`
    assert cache.page_rate(page, page) == 0.007507552643049313


def test_a_page_without_cache_series_gives_none() -> None:
    page = server_metrics.parse((PAGES / "trtllm.prom").read_text())
    assert cache.page_rate(page, page) is None


def test_the_band_names_both_numbers() -> None:
    assert cache.band_reason({"band": (0.9, 1.0), "hit_rate": 0.95, "source": "x"}) is None
    why = cache.band_reason({"band": (0.9, 1.0), "hit_rate": 0.412, "source": "counters"})
    assert why is not None and "0.412" in why and "[0.90, 1.00]" in why
    assert "none was measured" in (cache.band_reason({"band": (0.5, 1.0), "hit_rate": None}) or "")
    assert cache.band_reason({"band": None, "hit_rate": 0.1}) is None
    for bad in [(1.0, 0.9), (0.5,), "0.9", (-0.1, 1.0), (0.5, 1.5), (True, 1.0)]:
        with pytest.raises(ValueError, match="cache_hit_rate"):
            cache.check_band(bad)


class Counting:
    """A sim engine with a prefix cache of its own that reports planned counters."""

    def __init__(self, hits_per_request: int, prompt_tokens: int) -> None:
        self.inner = load_engine("sim", {"ttft_s": 0.001, "tokens_per_s": 5000, "slots": 8})
        self.info = self.inner.info
        self.hits = self.queries = 0
        self.per_request = (hits_per_request, prompt_tokens)
        self.flushed = 0

    def stream(self, request):  # type: ignore[no-untyped-def]
        self.hits += self.per_request[0]
        self.queries += self.per_request[1]
        return self.inner.stream(request)

    async def aclose(self) -> None:
        pass

    def flush_cache(self) -> None:
        self.flushed += 1

    def cache_counters(self) -> tuple[int, int]:
        return self.hits, self.queries


def test_a_run_outside_its_band_is_invalid_and_inside_it_is_not() -> None:
    engine = Counting(hits_per_request=30, prompt_tokens=100)
    runner = Tokperf(engine, profiles.BUILTIN["sim"])  # type: ignore[arg-type]
    engine.hits = 5_000  # what ran before the run does not count
    result = runner.run(requests=8, max_tokens=2, warmup=2, cache_hit_rate=(0.9, 1.0))
    assert result.cache is not None
    # the warm-up's 2 requests are not the run's: 8 x 30 hits of 8 x 100 tokens
    assert (result.cache["hits"], result.cache["queries"]) == (240, 800)
    assert result.cache["hit_rate"] == 0.3
    reasons = [r for r in run_validity(result) if "prefix-cache" in r]
    assert len(reasons) == 1 and "0.300" in reasons[0] and "[0.90, 1.00]" in reasons[0]
    ok = runner.run(requests=8, max_tokens=2, warmup=0, cache_hit_rate=(0.25, 0.35))
    assert not [r for r in run_validity(ok) if "prefix-cache" in r]


def test_a_band_on_an_engine_without_counters_is_invalid() -> None:
    runner = Tokperf(load_engine("sim", {"ttft_s": 0.001}), profiles.BUILTIN["sim"])
    result = runner.run(requests=2, max_tokens=2, warmup=0, cache_hit_rate=(0.0, 1.0))
    assert any("none was measured" in r for r in run_validity(result))
    plain = runner.run(requests=2, max_tokens=2, warmup=0)
    assert plain.cache is None  # nothing asked, nothing measured


def test_the_fixture_object_flushes_primes_and_reads() -> None:
    engine = Counting(hits_per_request=0, prompt_tokens=10)
    sent: list[str] = []
    c = cache.Cache(engine, sent.extend)
    c.flush()
    assert engine.flushed == 1 and c.hit_rate() is None  # nothing asked since
    engine.hits, engine.queries = 9, 10
    assert c.hit_rate() == 0.9
    c.prime(workloads.shared_prefix(groups=2, prefix_tokens=5, suffix_tokens=2, per_group=1))
    assert len(sent) == 2 and c.hit_rate() is None  # counted from the prime on
    sim = cache.Cache(load_engine("sim", {}), sent.extend)
    with pytest.raises(cache.CacheError, match="cannot flush"):
        sim.flush()


def test_shared_prefix_workload() -> None:
    w = workloads.shared_prefix(groups=3, prefix_tokens=40, suffix_tokens=6, per_group=2)
    assert [p.id for p in w.prompts] == ["g0-0", "g1-0", "g2-0", "g0-1", "g1-1", "g2-1"]
    words = {p.id: p.prompt.split(" ")[1:] for p in w.prompts}
    assert all(len(v) == 46 for v in words.values())
    assert words["g0-0"][:40] == words["g0-1"][:40]  # one group's prefix
    assert words["g0-0"][40:] != words["g0-1"][40:]  # its own suffix
    assert words["g0-0"][:40] != words["g1-0"][:40]
    assert workloads.load(w) is w
    with pytest.raises(ValueError, match="groups=0"):
        workloads.shared_prefix(groups=0, prefix_tokens=4, suffix_tokens=1)


class _Server:
    """A loopback stand-in for vLLM's or SGLang's admin side: serves a recorded
    /metrics page and records the POSTs it gets (anything else is a 404)."""

    def __init__(self, page: str, flush_path: str) -> None:
        import http.server
        import threading

        posts: list[str] = []
        self.posts = posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == "/metrics"
                self.send_response(200 if ok else 404)
                self.end_headers()
                if ok:
                    self.wfile.write(page.encode())

            def do_POST(self) -> None:
                posts.append(self.path)
                self.send_response(200 if self.path == flush_path else 404)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Served:
    def __init__(self, url: str) -> None:
        from pytest_tokperf.engines import EngineInfo

        self.info = EngineInfo("openai", "m", "bf16", 1, settings={"base_url": url})


@pytest.mark.parametrize(
    ("page", "path"), [("vllm.prom", "/reset_prefix_cache"), ("sglang.prom", "/flush_cache")]
)
def test_flushing_a_server_posts_to_its_own_endpoint(page: str, path: str) -> None:
    server = _Server((PAGES / page).read_text(), path)
    try:
        c = cache.Cache(_Served(server.url), lambda prompts: None)
        c.flush()
        assert server.posts == [path]
    finally:
        server.close()
    unknown = _Server((PAGES / "trtllm.prom").read_text(), "/nowhere")
    try:
        with pytest.raises(cache.CacheError, match="cannot flush the prefix cache"):
            cache.Cache(_Served(unknown.url), lambda prompts: None).flush()
        assert unknown.posts == []
    finally:
        unknown.close()

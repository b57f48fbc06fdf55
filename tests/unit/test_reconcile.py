"""Settling per-read token counts to the stream's total (engines.reconcile)."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from pytest_tokperf.engines import Completion, Request, reconcile
from pytest_tokperf.flights import Live


def test_usage_below_the_events_takes_off_the_end_never_negative() -> None:
    # 4 text events with usage 3: today's (1, 1, 1, 1, -1) becomes (1, 1, 1, 0)
    assert reconcile([1, 1, 1, 1], 0, 3) == [1, 1, 1, 0]
    # usage + [DONE] counted in the last read come off it first
    assert reconcile([1, 1, 3], 2, 3) == [1, 1, 1]
    assert reconcile([2, 1, 2], 2, 5) == [4, 1, 0]


def test_several_tokens_per_event_are_spread_where_they_arrived() -> None:
    assert reconcile([1, 1, 1, 1], 0, 8) == [2, 2, 2, 2]
    assert reconcile([1, 1], 0, 3) == [2, 1]
    assert reconcile([3], 2, None) == [1]  # no total: only the trailing events go


@given(
    st.lists(st.integers(0, 50), max_size=30),
    st.integers(0, 10),
    st.one_of(st.none(), st.integers(0, 2000)),
)
def test_counts_stay_non_negative_sum_to_the_total_and_keep_the_first(
    counts: list[int], trailing: int, total: int | None
) -> None:
    out = reconcile(counts, trailing, total)
    assert len(out) == len(counts) and all(n >= 0 for n in out)
    left = max(0, sum(counts) - trailing)
    if total is None or left == 0:
        assert sum(out) == left
    else:
        assert sum(out) == total
        first = next(i for i, n in enumerate(counts) if n)  # the first read with a token
        if total > 0:
            assert out[first] >= 1 and all(n == 0 for n in out[:first])


@given(
    st.lists(st.integers(0, 50), max_size=30),
    st.integers(0, 10),
    st.one_of(st.none(), st.integers(0, 2000)),
)
@example([1, 1, 2], 2, 2)  # usage and [DONE] alone in the last read: it drops out
@example([2], 2, 0)  # one read, no token in it
def test_the_drivers_shortcut_settles_as_reconcile_does(
    counts: list[int], trailing: int, total: int | None
) -> None:
    # the driver settles the common case (trailing events in the last read, the count
    # matching) without calling reconcile: it must give reconcile's answer, zeros dropped
    live = Live(Request("r", "p", 8), 0, None)
    live.chunk_ns = [10 * (i + 1) for i in range(len(counts))]
    live.chunk_tokens = list(counts)
    live.settle(Completion(total, trailing))
    settled = reconcile(counts, trailing, total)
    kept = [(10 * (i + 1), n) for i, n in enumerate(settled) if n > 0]
    if total and not kept:  # no read was counted: the tokens came at the end
        assert live.chunk_tokens == [total]
        return
    assert list(zip(live.chunk_ns, live.chunk_tokens, strict=True)) == kept

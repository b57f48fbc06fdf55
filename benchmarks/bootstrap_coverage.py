"""How often the parity gate's bootstrap interval covers the truth, by sample count.

The parity verdict (`pytest_tokperf.accuracy.score`) judges each ROUGE ratio on a
paired percentile bootstrap interval at a nominal 95%. With few samples that interval
is far too narrow (one sample gives a point), so a verdict on it is a coin toss; this
measures the real coverage on simulated per-sample scores whose true ratio is known,
which is where `accuracy.MIN_SAMPLES` comes from.

Simulated scores: a reference engine's per-sample score ~ 100 x Beta(2, 3) (ROUGE-like:
mean 40, wide spread across prompts), the test engine's = reference x LogNormal(-0.05,
0.25) (a quantization that costs about 2% on average, unevenly). The truth is the ratio
of means over 200,000 samples.

    python benchmarks/bootstrap_coverage.py [--trials 1000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import random

from pytest_tokperf.accuracy import MIN_SAMPLES, _ratio, bootstrap

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


def scores(rng: random.Random, n: int) -> tuple[list[float], list[float]]:
    ref = [100 * rng.betavariate(2, 3) for _ in range(n)]
    test = [r * rng.lognormvariate(-0.05, 0.25) for r in ref]
    return test, ref


def coverage(n: int, trials: int, resamples: int, truth: float, seed: int) -> float:
    rng = random.Random(seed)
    hits = 0
    for k in range(trials):
        test, ref = scores(rng, n)
        ci = bootstrap(n, _ratio(test, ref), resamples=resamples, seed=k)
        hits += ci.low <= truth <= ci.high
    return hits / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    test, ref = scores(random.Random(1), 200_000)
    truth = sum(test) / sum(ref)
    print(f"true ratio {truth:.4f}; nominal 95% intervals; {args.trials} trials per size")
    print("samples  coverage")
    for n in SIZES:
        mark = "  <- accuracy.MIN_SAMPLES" if n == MIN_SAMPLES else ""
        print(f"{n:7d}  {coverage(n, args.trials, args.resamples, truth, n):.3f}{mark}")


if __name__ == "__main__":
    main()

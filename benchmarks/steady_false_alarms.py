"""How often the steadiness check (steady.change_point) fires on a steady engine.

Series of 10 iid normal window rates (mean 100, coefficient of variation as given): a
change point found in any of them is a false alarm. Pure arithmetic, the same on any CPU.

    python benchmarks/steady_false_alarms.py --series 20000
"""

from __future__ import annotations

import argparse
import random

from pytest_tokperf import steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=20_000)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--cv", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = parser.parse_args()
    for cv in args.cv:
        rng = random.Random(1)
        hits = sum(
            steady.change_point([max(1e-9, rng.gauss(100, 100 * cv)) for _ in range(args.windows)])
            is not None
            for _ in range(args.series)
        )
        print(f"cv {cv:.2f}: {hits}/{args.series} false alarms ({hits / args.series:.2%})")


if __name__ == "__main__":
    main()

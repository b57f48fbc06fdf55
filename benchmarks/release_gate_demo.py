"""Does the examples' release gate catch a slower embedded engine on this machine?

Saves a baseline of `examples/test_release_gate.py` with the embedded engine, then
alternates comparisons of the unchanged engine and a changed one, each a separate
pytest process, and prints each comparison's ratio, interval and verdict. Two ways to
change it:

- `--changed-env PYTEST_XDIST_WORKER_COUNT=2`: the engine's n_threads halved (it
  believes it shares the cores with a second xdist worker);
- `--pin 0 --burn 0.4`: every run pinned to core 0 (so n_threads 1), and the changed
  runs share that core with a busy loop that wants it 40% of the time: the engine keeps
  about 80% of the core (a 20% slowdown, when nothing else competes for core 0).

    python benchmarks/release_gate_demo.py --rounds 3 --changed-env PYTEST_XDIST_WORKER_COUNT=2
    python benchmarks/release_gate_demo.py --rounds 3 --pin 0 --burn 0.4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST = "examples/test_release_gate.py"


BURNER = """
import sys, time
busy, period = float(sys.argv[1]) * 0.1, 0.1
while True:
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
    time.sleep(period - busy)
"""


def run(
    env: dict[str, str],
    folder: Path,
    name: str,
    *args: str,
    pin: int | None = None,
    burn: float = 0.0,
) -> dict[str, object]:
    out = folder / f"{name}.json"
    cmd = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider",
           "--tokperf-json", str(out), *args]  # fmt: skip
    cores = None if pin is None else {pin}

    def pinned() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)

    burner = None
    if burn > 0:
        burner = subprocess.Popen([sys.executable, "-c", BURNER, str(burn)], preexec_fn=pinned)
    started = time.perf_counter()
    try:
        subprocess.run(cmd, env={**os.environ, **env}, check=False, stdout=subprocess.DEVNULL,
                       preexec_fn=pinned)  # fmt: skip
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    (test,) = json.loads(out.read_text())["tests"]
    test["wall_s"] = time.perf_counter() - started
    return test


def parse_env(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-env", nargs="*", default=[])
    parser.add_argument("--changed-env", nargs="*", default=[])
    parser.add_argument("--pin", type=int, default=None, help="run everything on this core")
    parser.add_argument("--burn", type=float, default=0.0, help="busy share of the burner")
    args = parser.parse_args()
    base_env, changed_env = parse_env(args.base_env), parse_env(args.changed_env)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.rounds):
            # a fresh baseline each round: this machine's speed drifts between minutes
            saved = str(folder / f"b{i}")
            base = run(base_env, folder, f"base{i}", "--tokperf-save-baseline", saved, pin=args.pin)
            print(
                f"round {i + 1} baseline  n_threads {base['engine']['settings']['n_threads']}: "  # type: ignore[index]
                f"{base['tokens_per_s']:.1f} tokens/s; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            for label, env, burn in (("unchanged", base_env, 0.0),
                                     ("changed", changed_env, args.burn)):  # fmt: skip
                t = run(env, folder, f"{label}{i}", "--tokperf-compare-baseline", saved,
                        pin=args.pin, burn=burn)  # fmt: skip
                block = t["regression"]  # type: ignore[index]
                (c,) = [c for c in block["checks"] if c["metric"] == "tokens_per_s"]
                n = t["engine"]["settings"]["n_threads"]  # type: ignore[index]
                print(
                    f"round {i + 1} {label:9} n_threads {n}: {t['tokens_per_s']:.1f} tokens/s, "
                    f"ratio {c['ratio']:.3f} (95% CI {c['low']:.3f}-{c['high']:.3f}) "
                    f"-> {c['status']}, test {t['verdict']}; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `convert-openorca IN.pkl OUT.jsonl --allow-pickle`, `parity`, `merge`,
`recompute`, `calibrate`, `recover`, `history` and `options-doc`.

`python -m pytest_tokperf merge node*.json --out rack.json` judges a rack from nodes
launched by separate jobs; `python -m pytest_tokperf recompute RECORDS --json DOC`
recomputes every run's metrics from a records file and checks them against the JSON.
`python -m pytest_tokperf recover PATH.journal [--out PATH]` rebuilds the JSON
results of a session that never wrote them (killed, crashed) from its journal.
`python -m pytest_tokperf history DIR` prints the change points of every test's
history (a --tokperf-history folder, or a folder of results files).

`python -m pytest_tokperf parity --precision q4_0` measures accuracy parity of the
embedded engine outside a test suite, with the same code and report as the marker.

MLPerf's Llama-2-70B dataset is a pandas pickle of OpenOrca samples. Loading a pickle
runs whatever code it holds, so the command refuses unless `--allow-pickle` says the
file is trusted. The output is the plugin's JSONL workload format, with each sample's
reference answer (MLPerf's `output` column) for ROUGE scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def openorca_prompts(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """JSONL objects from MLPerf OpenOrca rows.

    The prompt is the system prompt and the question (the engine applies its own chat
    template, so MLPerf's Llama-2-formatted `input` is only a fallback); the reference
    is `output`, the answer MLPerf scores ROUGE against.
    """
    out: list[dict[str, str]] = []
    for number, row in enumerate(rows):
        question = row.get("question") or row.get("input")
        reference = row.get("output")
        if not isinstance(question, str) or not question:
            raise ValueError(f"row {number}: no 'question' (or 'input') text")
        if not isinstance(reference, str):
            raise ValueError(f"row {number}: no 'output' text (the reference answer)")
        system = row.get("system_prompt")
        prompt = (
            f"{system.strip()}\n\n{question}"
            if isinstance(system, str) and system.strip()
            else question
        )
        out.append({"id": str(row.get("id", number)), "prompt": prompt, "reference": reference})
    return out


def convert_openorca(source: Path, target: Path) -> int:
    """Convert MLPerf's OpenOrca pickle to JSONL; returns the number of samples."""
    try:
        import pandas
    except ModuleNotFoundError:
        raise SystemExit(
            "convert-openorca needs pandas to read the MLPerf pickle: pip install pandas"
        ) from None
    frame = pandas.read_pickle(source)
    rows = frame.to_dict(orient="records")
    prompts = openorca_prompts(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return len(prompts)


def parity(args: argparse.Namespace) -> int:
    """Measure and print one parity result of the embedded engine (cpu profile)."""
    import asyncio
    import dataclasses

    from pytest_tokperf import accuracy, report, runner, workloads
    from pytest_tokperf.engines import load_engine
    from pytest_tokperf.profiles import BUILTIN

    profile = dataclasses.replace(BUILTIN["cpu"], precision=args.precision)
    threads = {"n_threads": args.threads} if args.threads else {}
    reference = load_engine("llamacpp", {"precision": args.reference, **threads})
    test = load_engine("llamacpp", {"precision": args.precision, **threads})
    try:
        result = runner.run_parity(
            test,
            reference,
            workloads.load(args.dataset),
            samples=args.samples,
            max_tokens=args.max_tokens,
            default_max_tokens=profile.max_tokens,
            spec=accuracy.ParitySpec(reference=args.reference, rouge_ratio=args.rouge_ratio),
            reference_precision=args.reference,
            timeout_s=args.timeout,
        )
    finally:
        for engine in (test, reference):
            asyncio.run(engine.aclose())
    data = report.parity_payload(f"{args.precision} vs {args.reference}", result, profile)
    s = result.scores
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        print(
            f"{report.PARITY_NAMES[key]}: {s[key]:.2f} vs reference {s['reference_' + key]:.2f} "
            f"(ratio {s[key + '_ratio']:.3f})"
        )
    print(
        f"tokens per sample: {s['tokens_per_sample']:.1f} vs {s['reference_tokens_per_sample']:.1f}"
        f"; exact match {s['exact_match']}; KL {s['kl']}; top-1 {s['top1']}"
    )
    for line in report.parity_table([data]):
        print(line)
    if not result.passed:
        print(report.parity_message(data))
    if args.json:
        report.write_json(Path(args.json), data)
    return 0 if result.passed else 1


def merge(args: argparse.Namespace) -> int:
    """Judge the rack from node JSON files; print the table; 0 when every rack passed."""
    from pytest_tokperf import merge as merging
    from pytest_tokperf import rackjudge, report

    try:
        rows = merging.merge(args.nodes, args.per_rack)
    except (merging.MergeError, OSError, KeyError, ValueError) as exc:
        print(f"merge: {exc}", file=sys.stderr)
        return 2
    racks = [r for r in rows if r.get("kind") == "rack"]
    for line in rackjudge.table(racks):
        print(line)
    for row in racks:
        if row["verdict"] != "PASS":
            print(f"{row['nodeid']}: {row['verdict']}\n{rackjudge.message(row)}")
    if args.out:
        doc = {
            "schema": report.SCHEMA,
            "kind": "merge",
            "inputs": [str(p) for p in args.nodes],
            "summary": {s: sum(1 for r in racks if r["verdict"] == s) for s in report.VERDICTS},
            "tests": rows,
        }
        report.write_json(Path(args.out), doc)
        print(f"results: {args.out}")
    return 0 if all(r["verdict"] == "PASS" for r in racks) else 1


def recompute(args: argparse.Namespace) -> int:
    """Metrics of every run from the records; 1 when a last run disagrees with the JSON."""
    from pytest_tokperf import merge as merging

    doc = json.loads(Path(args.json).read_text(encoding="utf-8")) if args.json else None
    table, ok = merging.recompute(Path(args.records), doc)
    for line in merging.aligned(table):
        print(line)
    if doc is not None:
        print("every last run matches the JSON" if ok else "MISMATCH: records and JSON differ")
    return 0 if ok else 1


def recover(args: argparse.Namespace) -> int:
    """Rebuild the results document from a journal; a bad journal is a one-line error."""
    from pytest_tokperf import journal

    try:
        out, doc = journal.recover(Path(args.journal), None if args.out is None else Path(args.out))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write the results: {exc}", file=sys.stderr)
        return 1
    state = doc["recovered"]
    ended = "the session finished" if state["session_finished"] else "the session did not finish"
    torn = "; its last line was cut short (dropped)" if state["last_line_torn"] else ""
    print(f"recovered {len(doc['tests'])} test results from {args.journal} ({ended}{torn}): {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_tokperf")
    commands = parser.add_subparsers(dest="command", required=True)
    orca = commands.add_parser(
        "convert-openorca", help="MLPerf OpenOrca pickle (pandas) -> tokperf JSONL workload"
    )
    orca.add_argument("source", type=Path, help="the .pkl file from MLPerf")
    orca.add_argument("target", type=Path, help="the JSONL file to write")
    orca.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load the pickle although loading a pickle runs code: only for trusted files",
    )
    par = commands.add_parser(
        "parity", help="accuracy parity of the embedded engine at one precision vs another"
    )
    par.add_argument("--precision", default="q4_0", help="precision under test")
    par.add_argument("--reference", default="f16", help="reference precision")
    par.add_argument("--dataset", default=None, help="built-in set or JSONL (default: default)")
    par.add_argument("--samples", type=int, default=16)
    par.add_argument("--max-tokens", type=int, default=64)
    par.add_argument("--rouge-ratio", type=float, default=0.99)
    par.add_argument("--threads", type=int, default=None, help="llama.cpp threads per engine")
    par.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine")
    par.add_argument("--json", default=None, help="write the result payload here")
    mer = commands.add_parser(
        "merge", help="judge a rack from node JSON files (each run with --tokperf-records)"
    )
    mer.add_argument("nodes", type=Path, nargs="+", help="one JSON results file per node")
    mer.add_argument("--out", default=None, help="write the rack results here")
    mer.add_argument("--per-rack", type=float, default=None, help="rack floor, output tokens/s")
    rec = commands.add_parser("recompute", help="every metric again, from a records file")
    rec.add_argument("records", help="the --tokperf-records file")
    rec.add_argument("--json", default=None, help="the --tokperf-json file to compare with")
    cal = commands.add_parser(
        "calibrate",
        help="run the suite N times and propose floors, SLO limits and regression tolerances",
    )
    cal.add_argument("paths", nargs="+", help="test paths, as for pytest")
    cal.add_argument("-n", type=int, default=5, help="runs (at least 3; default 5)")
    cal.add_argument(
        "--probability", type=float, default=0.95, help="share of unchanged runs that must pass"
    )
    cal.add_argument("--confidence", type=float, default=0.90, help="of the tolerance bound")
    cal.add_argument("--out", default=None, help="write the tokperf.toml snippet here")
    cal.add_argument("--baseline", default=None, help="also save the last run as a baseline here")
    rcv = commands.add_parser(
        "recover", help="rebuild the JSON results from the journal of an interrupted session"
    )
    rcv.add_argument("journal", help="the PATH.journal file next to --tokperf-json PATH")
    rcv.add_argument("--out", default=None, help="where to write (default: PATH)")
    from pytest_tokperf import history

    history.add_parser(commands)
    commands.add_parser("options-doc", help="print the options reference (docs/options.md)")
    # everything after `--` goes to pytest: `calibrate examples -n 5 -- -k offline`
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    extra = argv[cut + 1 :]
    args = parser.parse_args(argv[:cut])
    if args.command == "parity":
        return parity(args)
    if args.command == "calibrate":
        from pytest_tokperf import calibrate

        args.pytest_args = extra
        return calibrate.main(args)
    if args.command == "merge":
        return merge(args)
    if args.command == "recompute":
        return recompute(args)
    if args.command == "recover":
        return recover(args)
    if args.command == "history":
        return history.main(args)
    if args.command == "options-doc":
        from pytest_tokperf import optionsdoc

        sys.stdout.write(optionsdoc.markdown())
        return 0
    if not args.allow_pickle:
        parser.error(
            f"refusing to load {args.source}: loading a pickle runs the code inside it; "
            "pass --allow-pickle if you trust the file"
        )
    if not args.source.is_file():
        parser.error(f"{args.source} does not exist")
    count = convert_openorca(args.source, args.target)
    print(f"wrote {count} samples to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

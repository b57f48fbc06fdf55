"""benchmarks/gpu_check.py, the GPU day, rehearsed end to end on this machine (a recorded
one-GPU inventory, the tiny transformers preset on the CPU, the embedded suite on the
tiny GGUF, two client processes, wide verdict margins), so the script cannot rot before
a session is lent a GPU; and the pieces it carries there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_carry  # noqa: E402
import gpu_check  # noqa: E402

pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
pytest.importorskip("transformers", reason="needs the 'transformers' extra")
pytest.importorskip("aiohttp", reason="needs the 'openai' extra")

OUT_FILES = {"gpu_check.json", "summary.txt", "examples.json", "embedded.json", "client.json",
             "verdicts.json"}  # fmt: skip


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    tmp = tmp_path_factory.mktemp("gpu-day")
    out = tmp / "out"
    cmd = [
        sys.executable, str(BENCH / "gpu_check.py"), "--rehearse", "--out", str(out),
        "--work", str(tmp / "work"), "--site", str(tmp / "no-site"),
        "--select", "test_offline_throughput_per_gpu", "--tiny-gguf", "--force-extra-bufts",
        "--embedded-cores", "1",
        "--client-target", "20000", "--client-procs", "2", "--client-seconds", "3",
        "--floor-factors", "0.2,5", "--regression-tolerance", "0.5",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), done.stdout


def test_every_step_ran_and_wrote_at_most_seven_files(rehearsal: Any) -> None:
    out, report, stdout = rehearsal
    assert {p.name for p in out.iterdir()} == OUT_FILES  # + log.txt by tee: the tool's 8
    steps = report["steps"]
    assert list(steps) == [name for name, *_ in gpu_check.STEPS]
    assert steps["site"]["status"] == "skip" and "no-site" in steps["site"]["reason"]
    broken = {k: s for k, s in steps.items() if k != "site" and s["status"] != "ok"}
    assert not broken
    assert report["versions"]["cores"] == len(os.sched_getaffinity(0))
    summary = (out / "summary.txt").read_text()
    assert summary.splitlines() == report["summary"] and "=== summary ===" in stdout
    assert f"CPU {gpu_check.cpu_model()}" in summary.splitlines()[0]


def test_the_gpu_steps_on_the_recorded_gpu(rehearsal: Any) -> None:
    _, report, _ = rehearsal
    steps = report["steps"]
    assert steps["inventory"]["gpus"] == 1 and "recorded in" in steps["inventory"]["describe"]
    # a lone H100 matches no built-in profile: a plain `pytest` says so and stops
    assert any("no tokperf GPU profile matches" in x for x in steps["inventory"]["detected"])
    assert (steps["allocate"]["held"], steps["allocate"]["told_taken"]) == (1, 1)
    (row,) = steps["examples"]["results"]
    assert row["nodeid"].endswith("test_offline_throughput_per_gpu") and row["verdict"] == "PASS"
    assert row["tokens_per_s_per_gpu"] > 0 and row["energy_j_per_token"] is not None
    assert row["device"] == "cpu" and report["model"]["name"] == "tiny"


def test_the_host_cpu_step(rehearsal: Any) -> None:
    from pytest_tokperf.engines.llamacpp import backend_amx, choose_extra_bufts, cpu_amx_flags

    out, report, _ = rehearsal
    host = report["steps"]["host_cpu"]
    assert host["amx_flags"] == cpu_amx_flags()
    assert host["llama_cpp_amx_built"] == backend_amx()
    assert host["model"].endswith("tiny-smollm2-shape.gguf") and host["cores"] == 1
    embedded = host["embedded"]
    assert (embedded["extra_bufts"], embedded["extra_bufts_why"]) == choose_extra_bufts("auto")
    assert [v[:2] for v in embedded["verdicts"]] == [["test_offline_throughput_per_gpu", "PASS"]]
    doc = json.loads((out / "embedded.json").read_text())
    assert doc["tests"][0]["engine"]["backend"] == "llamacpp" and "records" not in doc
    assert doc["tests"][0]["engine"]["settings"]["n_threads"] == 1  # --embedded-cores 1
    forced = host["forced"]
    assert forced["extra_bufts"] is True and forced["requests"] == 4
    if not host["amx_flags"]:  # nothing to crash here: every request answered
        assert forced["crashed"] is False and forced["ok"] == 4 and forced["errors"] == []


def test_the_client_step(rehearsal: Any) -> None:
    _, report, _ = rehearsal
    client = report["steps"]["client"]
    assert len(client["server_cores"]) + len(client["client_cores"]) == client["cores"]
    for mode in ("burst", "paced"):
        m = client[mode]
        assert m["client_procs"] == 2 and m["requests"] > m["concurrency"]
        assert m["output_tokens"] == m["requests"] * m["tokens_per_answer"]
        assert m["tokens_per_s"] > 0 and m["client_cpu_us_per_token"] > 0
        assert m["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE", "INVALID")
    follows = client["follows_target"]
    assert follows["measured"] == {m: client[m]["verdict"] == "PASS" for m in ("burst", "paced")}
    cost = client["paced"]["client_cpu_us_per_token"]
    expected = (client["cores"] - 1) * 0.9 / (cost * 1e-6)
    assert follows["projected_tokens_per_s"] == pytest.approx(expected, rel=0.01)


def test_the_verdicts_on_floors_around_the_measured_rate(rehearsal: Any) -> None:
    _, report, _ = rehearsal
    v = report["steps"]["verdicts"]
    rate = report["steps"]["examples"]["results"][0]["tokens_per_s_per_gpu"]
    assert v["rate"] == rate and v["floors"] == [round(rate * 0.2, 2), round(rate * 5, 2)]
    tests = v["tests"]
    assert tests["first:test_floor_below"]["verdict"] == "PASS"
    assert tests["first:test_floor_above"]["verdict"] == "FAIL"
    assert tests["first:test_floor_above"]["floors"] == {"per_gpu": v["floors"][1]}
    assert tests["first:test_no_regression"]["verdict"] == "MEASURED"  # saved as the baseline
    # compared with it: a noisy 2-core machine may not be decisive, but never a regression
    assert tests["second:test_no_regression"]["verdict"] in ("PASS", "IMPROVED", "INCONCLUSIVE")
    (check,) = tests["second:test_no_regression"]["regression"]
    assert check["tolerance"] == 0.5 and check["low"] <= check["ratio"] <= check["high"]
    assert check["status"] == tests["second:test_no_regression"]["verdict"]
    assert set(tests) == {"first:test_floor_below", "first:test_floor_above",
                          "first:test_no_regression", "second:test_no_regression"}  # fmt: skip


def test_the_children_find_the_plugin_where_it_is_not_installed(tmp_path: Path) -> None:
    """On the lent machine the tree is not installed (no entry point): PYTEST_PLUGINS."""
    env = gpu_check.child_env(os.environ, None)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(gpu_check.ROOT)
    assert gpu_check.plugin_installed() == ("PYTEST_PLUGINS" not in env)
    (tmp_path / "test_x.py").write_text("def test_x(): pass\n")
    # the entry point blocked, as if not installed: the plugin comes from PYTEST_PLUGINS
    blocked = [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:tokperf", "test_x.py"]
    env = dict(env, PYTEST_PLUGINS="pytest_tokperf.plugin")
    done = subprocess.run(blocked, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "tokperf: profile cpu" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_the_tiny_gguf_decodes_whole_answers(tmp_path: Path) -> None:
    import tiny_gguf

    from pytest_tokperf.engines.llamacpp import plain_llama

    path = tiny_gguf.write(tmp_path / "tiny.gguf")
    assert path.stat().st_size < 6e6
    llm = plain_llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False, seed=0)
    assert llm.n_vocab() == 259 and llm.metadata["general.file_type"] == "3"  # Q4_1
    out = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=24)
    assert out["usage"]["completion_tokens"] == 24  # EOS never wins the greedy pick


def test_the_carried_llama_cpp_keeps_one_copy_of_each_library() -> None:
    names = ["llama_cpp/llama.py", "llama_cpp/lib/libllama.so", "llama_cpp/lib/libllama.so.0",
             "llama_cpp/lib/libllama.so.0.5.0", "llama_cpp/lib/libggml-cpu.so.0.25.3",
             "llama_cpp/lib/libmtmd.so", "lib/libllama.so", "include/llama.h"]  # fmt: skip
    assert [n for n in names if gpu_carry.wanted(n)] == names[:3]

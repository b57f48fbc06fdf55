"""`python -m pytest_tokperf convert-openorca`: refuses pickles unless told, converts rows."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from pytest_tokperf import __main__ as cli
from pytest_tokperf import workloads

ROWS = [
    {
        "id": "orca.1",
        "system_prompt": "You are a helpful assistant.",
        "question": "What is 2+2?",
        "input": "<s>[INST] <<SYS>>...",
        "output": "2+2 is 4.",
    },
    {"id": "orca.2", "system_prompt": "", "question": "Say hi.", "output": "Hi!"},
]


def test_a_pickle_is_refused_without_the_flag(tmp_path: Path) -> None:
    source = tmp_path / "in.pkl"
    source.write_bytes(pickle.dumps(ROWS))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_tokperf", "convert-openorca", str(source), "o.jsonl"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "refusing to load" in proc.stderr and "--allow-pickle" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_pandas_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.pkl"
    source.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pandas", None)  # what "not installed" looks like
    with pytest.raises(SystemExit, match=r"needs pandas.*pip install pandas"):
        cli.main(["convert-openorca", str(source), str(tmp_path / "o.jsonl"), "--allow-pickle"])


def test_rows_become_a_jsonl_workload_with_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Frame:
        def __init__(self, rows: list[dict[str, Any]]) -> None:
            self.rows = rows

        def to_dict(self, orient: str) -> list[dict[str, Any]]:
            assert orient == "records"
            return self.rows

    def read_pickle(path: Path) -> Frame:
        return Frame(pickle.loads(Path(path).read_bytes()))

    # a stand-in with the one pandas call the command makes
    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(read_pickle=read_pickle))
    source, target = tmp_path / "in.pkl", tmp_path / "out" / "orca.jsonl"
    source.write_bytes(pickle.dumps(ROWS))
    assert cli.main(["convert-openorca", str(source), str(target), "--allow-pickle"]) == 0
    assert capsys.readouterr().out == f"wrote 2 samples to {target}\n"
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines == [
        {
            "id": "orca.1",
            "prompt": "You are a helpful assistant.\n\nWhat is 2+2?",
            "reference": "2+2 is 4.",
        },
        {"id": "orca.2", "prompt": "Say hi.", "reference": "Hi!"},
    ]
    load = workloads.load(target)  # what the plugin reads back
    assert [p.reference for p in load.prompts] == ["2+2 is 4.", "Hi!"]


def test_rows_without_output_are_rejected() -> None:
    with pytest.raises(ValueError, match="row 0: no 'output' text"):
        cli.openorca_prompts([{"question": "q"}])
    with pytest.raises(ValueError, match=r"row 0: no 'question' \(or 'input'\) text"):
        cli.openorca_prompts([{"output": "a"}])

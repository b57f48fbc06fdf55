"""Profile selection: command line > environment > ini > default; errors name the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tokperf.hardware.inventory import read_inventory
from pytest_tokperf.hardware.recorded import RecordedNvml
from pytest_tokperf.profiles import BUILTIN, Unmatched, load_user, select

DATA = Path(__file__).parent.parent / "data" / "nvml"


def test_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    assert select(None, "", None)[0].name == "cpu"
    assert select(None, "", None)[1] == "default"
    assert select(None, "cpu", "tox.ini")[1] == "ini option tokperf_profile in tox.ini"
    monkeypatch.setenv("TOKPERF_PROFILE", "cpu")
    assert select(None, "gb300-nvl72", "tox.ini")[1] == "environment variable TOKPERF_PROFILE"
    assert select("cpu", "", None)[1] == "--tokperf-profile"


def test_unknown_profile_names_source_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKPERF_PROFILE", "gb300")
    with pytest.raises(pytest.UsageError) as info:
        select(None, "", None)
    message = str(info.value)
    assert "'gb300' (from environment variable TOKPERF_PROFILE)" in message
    assert all(name in message for name in BUILTIN)


def test_gpu_profiles_carry_the_published_floors() -> None:
    # Azure ND GB300 v6 (MLPerf Inference v5.1, unverified): 15,200 per GPU on GB300 NVL72,
    # ~12,000 on GB200, ~3,000 on H100
    assert BUILTIN["gb300-nvl72"].floors["per_gpu"] == 15_200
    assert BUILTIN["gb200-nvl72"].floors["per_gpu"] == 12_000
    assert BUILTIN["h100-sxm"].floors["per_gpu"] == 3_000
    # 18 nodes x 4 GPUs x 15,290 is the rack's 1,100,948 tokens/s, within rounding
    assert abs(18 * 4 * 15_290 - 1_100_948) / 1_100_948 < 0.001


def test_a_profile_whose_engine_is_missing_is_still_selected() -> None:
    # whether the engine ships is checked when it loads, after GPUs were allocated:
    # on a machine without the GPUs the tests skip for want of hardware first
    assert select("gb300-nvl72", "", None)[0].backend == "trtllm"


# --- user profiles -----------------------------------------------------------------

GOOD = """
[tool.tokperf.profiles.my-gb300]
extends = "gb300-nvl72"
model = "/models/llama2-70b-nvfp4"
floors = { per_gpu = 14400 }
engine = { max_batch_size = 2048 }

[tool.tokperf.profiles.my-gb300-tp2]
extends = "my-gb300"
tensor_parallel_size = 2
slos = { server = { ttft_p99_ms = 1500 } }
"""


def test_user_profiles_extend_and_merge(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(GOOD)
    registry = load_user(tmp_path)
    mine = registry["my-gb300"]
    base = BUILTIN["gb300-nvl72"]
    assert mine.model == "/models/llama2-70b-nvfp4" and mine.backend == "trtllm"
    assert mine.floors == {"per_gpu": 14_400.0}
    assert mine.engine == {"max_batch_size": 2048}
    assert mine.dataset == "mlperf-openorca"
    assert (mine.devices, mine.gpu_name, mine.nodes) == (base.devices, "GB300", 18)
    assert mine.defined_in == str(tmp_path / "pyproject.toml")
    tp2 = registry["my-gb300-tp2"]
    assert tp2.tensor_parallel_size == 2 and tp2.floors == {"per_gpu": 14_400.0}
    # tables merge key by key: the one SLO given replaces its own limit only
    assert tp2.slos == {**base.slos, "server": {**base.slos["server"], "ttft_p99_ms": 1500.0}}
    assert tp2.slos["server"]["tpot_p99_ms"] == 200.0
    assert set(BUILTIN) < set(registry)


def test_tokperf_toml_defines_a_whole_profile(tmp_path: Path) -> None:
    (tmp_path / "tokperf.toml").write_text(
        """
        [profiles.a100]
        description = "one A100 with vLLM over HTTP"
        backend = "openai"
        device_kind = "gpu"
        devices = 1
        precision = "bf16"
        model = "llama2-7b"
        requests = 512
        max_tokens = 256
        warmup = 8
        gpu_name = "A100"
        min_memory_gib = 39.5
        """
    )
    a100 = load_user(tmp_path)["a100"]
    assert (a100.backend, a100.devices, a100.min_memory_gib) == ("openai", 1, 39.5)
    assert a100.need().describe() == "1 GPU matching 'A100' with at least 39.5 GiB"


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        (
            '[tool.tokperf.profiles.x]\nextends = "gb300-nvl72"\nfloors = { per_gpu = -1 }',
            "profile 'x': key 'floors': per_gpu: expected a number > 0, got -1",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "gb300-nvl72"\ndevice = 4',
            "profile 'x': key 'device': unknown key; allowed: extends, description",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "gb300"',
            "profile 'x': key 'extends': 'gb300' is no profile defined before it",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "cpu"\nbackend = "vllm"',
            "key 'backend': expected one of llamacpp, openai, trtllm, sim, transformers, "
            "got 'vllm'",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "cpu"\nslos = { server_ttft_p99_s = 1.5 }',
            "key 'slos': unknown scenario 'server_ttft_p99_s'; allowed: offline, server",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "cpu"\nslos = { server = { ttft_p99 = 1 } }',
            "key 'slos': server: unknown key 'ttft_p99'; allowed: ttft_p50_ms",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "cpu"\ngpu_name = "H100("',
            "key 'gpu_name': not a regular expression",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "cpu"\nwarmup = true',
            "key 'warmup': expected an integer >= 0, got True",
        ),
        (
            '[tool.tokperf.profiles.x]\nextends = "cpu"\nmax_regression = 5',
            "key 'max_regression': expected a fraction from 0 up to 1, such as 0.1, got 5",
        ),
        ('[tool.tokperf.profiles.x]\nmodel = "m"', "profile 'x': missing keys description,"),
        ("[tool.tokperf.profiles.cpu]\nwarmup = 1", "profile 'cpu' is a built-in profile"),
        ("[tool.tokperf.profiles.x\n", "not valid TOML"),
    ],
)
def test_broken_user_profiles_name_file_profile_and_key(
    tmp_path: Path, toml: str, says: str
) -> None:
    (tmp_path / "pyproject.toml").write_text(toml)
    with pytest.raises(pytest.UsageError) as info:
        load_user(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "pyproject.toml"))
    assert says in str(info.value)


def test_a_profile_in_both_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.tokperf.profiles.x]\nextends = "cpu"')
    (tmp_path / "tokperf.toml").write_text('[profiles.x]\nextends = "cpu"')
    with pytest.raises(pytest.UsageError, match=r"profile 'x' is also defined in .*pyproject"):
        load_user(tmp_path)


@pytest.mark.parametrize(
    ("recording", "profile", "source"),
    [
        ("h100-sxm-8.json", "h100-sxm", "detected: 8 x NVIDIA H100 80GB HBM3"),
        ("gb300-node-4.json", "gb300-nvl72", "detected: 4 x NVIDIA GB300"),
        ("h200-8.json", "h200", "detected: 8 x NVIDIA H200"),
        ("no-driver.json", "cpu", "default"),
    ],
)
def test_detection_from_the_inventory(
    monkeypatch: pytest.MonkeyPatch, recording: str, profile: str, source: str
) -> None:
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    inventory = read_inventory(RecordedNvml.load(DATA / recording))
    chosen, said = select(None, "", None, BUILTIN, inventory)
    assert chosen.name == profile
    assert said.startswith(source)
    # a name given anywhere wins over detection
    assert select("cpu", "", None, BUILTIN, inventory)[0].name == "cpu"


@pytest.mark.parametrize(
    ("recording", "says"),
    [
        # two H100s are not an 8-GPU h100-sxm node
        ("h100-busy.json", "GPU 0 is 'NVIDIA H100 80GB HBM3', 80 GiB, compute capability 9.0"),
        ("l40s-2.json", "GPU 0 is 'NVIDIA L40S', 45 GiB, compute capability 8.9"),
    ],
)
def test_gpus_no_profile_matches_are_an_error_with_a_profile_to_add(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recording: str, says: str
) -> None:
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    inventory = read_inventory(RecordedNvml.load(DATA / recording))
    with pytest.raises(Unmatched) as info:
        select(None, "", None, BUILTIN, inventory)
    message = str(info.value)
    assert message.startswith("no tokperf GPU profile matches this machine's GPUs: 2 x NVIDIA")
    assert says in message and "does not fall back to the cpu profile" in message
    # the snippet is a valid profile, and it matches these very GPUs
    snippet = message[message.index("[tool.tokperf.profiles.") :]
    (tmp_path / "pyproject.toml").write_text(snippet)
    registry = load_user(tmp_path)
    chosen, source = select(None, "", None, registry, inventory)
    assert chosen.defined_in == str(tmp_path / "pyproject.toml")
    assert chosen.floors == {} and source.startswith("detected: 2 x NVIDIA")


def test_compute_capability_and_reference_keys(tmp_path: Path) -> None:
    (tmp_path / "tokperf.toml").write_text(
        '[profiles.mine]\nextends = "gb300-nvl72"\ncompute_capability = "10.0"\n'
        'reference_model = "/ckpt/fp8"\nreference_precision = "fp8"\n'
        "parity = { rouge_fraction = 0.999 }\n"
    )
    mine = load_user(tmp_path)["mine"]
    assert mine.compute_capability == (10, 0) and mine.need().compute_capability == (10, 0)
    assert (mine.reference_model, mine.reference_precision) == ("/ckpt/fp8", "fp8")
    assert mine.parity["rouge_fraction"] == 0.999
    assert mine.parity["tokens_per_sample_low"] == 0.9  # merged with the parent's
    for bad in ('"ten"', "0.0"):  # no GPU has capability 0.x (hypothesis found 0.0 accepted)
        (tmp_path / "tokperf.toml").write_text(
            f'[profiles.x]\nextends = "cpu"\ncompute_capability = {bad}'
        )
        with pytest.raises(pytest.UsageError, match=r"key 'compute_capability': expected \"MA"):
            load_user(tmp_path)


def test_h200_is_fp8_without_a_default_floor() -> None:
    h200 = BUILTIN["h200"]
    assert (h200.precision, h200.backend, h200.devices) == ("fp8", "trtllm", 1)
    assert h200.floors == {} and h200.rack_floor is None
    assert h200.compute_capability == BUILTIN["h100-sxm"].compute_capability == (9, 0)
    assert BUILTIN["gb200-nvl72"].compute_capability == (10, 0)
    assert BUILTIN["gb300-nvl72"].compute_capability == (10, 3)


def test_user_profiles_are_detected_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKPERF_PROFILE", raising=False)
    (tmp_path / "tokperf.toml").write_text('[profiles.pair]\nextends = "h100-sxm"\ndevices = 2')
    registry = load_user(tmp_path)
    inventory = read_inventory(RecordedNvml.load(DATA / "h100-busy.json"))
    assert select(None, "", None, registry, inventory)[0].name == "pair"


def test_nvl72_rack_floor_is_72_gpus_at_the_per_gpu_floor() -> None:
    for name, published in (("gb300-nvl72", 1_100_948), ("gb200-nvl72", 865_000)):
        p = BUILTIN[name]
        assert p.nodes * p.devices == 72
        assert p.rack_floor == 72 * p.floors["per_gpu"]
        # the floor sits under the published rack result, within 1%
        assert p.rack_floor is not None and 0.99 * published < p.rack_floor <= published

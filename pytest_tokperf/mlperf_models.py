"""MLPerf Inference's LLM benchmarks after Llama-2-70B: latency limits and run sizes.

Every number here is copied from mlcommons/inference at commit
b66003e10e2db4b8c36a448b0545ec90fcc6e9e9 (2026-08-20); `SOURCE` names the file:
- `loadgen/mlperf.conf`: `<model>.Server.ttft_latency` / `tpot_latency` (ms; the
  `-interactive` benchmarks are the Server scenario with their own limits) and
  `<model>.*.performance_sample_count_override` (the requests of one pass).
- `max_tokens`: the reference implementation's output bound: Llama-3.1-8B and
  Llama-3.1-405B `language/<model>/SUT_VLLM.py` (`max_tokens` 128 and 2000),
  DeepSeek-R1 `language/deepseek-r1/utils/backend_registry.py` (`MAX_OSL = 20 * 1000`),
  GPT-OSS-120B `language/gpt-oss-120b/README.md` (performance `max_output_len` 10240).

Left out because not verified here: accuracy targets (ROUGE, exact match) and
tokens-per-sample bounds of the new models (the submission checker's constants differ
between rounds), per-GPU floors (no published per-GPU figure was checked), and dataset
converters (their datasets are not public in one file as OpenOrca's is).
"""

from __future__ import annotations

SOURCE = "mlcommons/inference@b66003e10e2db4b8c36a448b0545ec90fcc6e9e9 loadgen/mlperf.conf"

# model -> scenario -> latency_slo keyword -> ms (from `<model>[-interactive].Server.*`)
SLOS: dict[str, dict[str, dict[str, float]]] = {
    "llama2-70b": {
        "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 200.0},
        "interactive": {"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0},
    },
    "llama3_1-8b": {
        "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 100.0},
        "interactive": {"ttft_p99_ms": 500.0, "tpot_p99_ms": 30.0},
    },
    "llama3_1-405b": {
        "server": {"ttft_p99_ms": 6_000.0, "tpot_p99_ms": 175.0},
        "interactive": {"ttft_p99_ms": 4_500.0, "tpot_p99_ms": 80.0},
    },
    "deepseek-r1": {
        "server": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 80.0},
        "interactive": {"ttft_p99_ms": 1_500.0, "tpot_p99_ms": 15.0},
    },
    "gpt-oss-120b": {
        "server": {"ttft_p99_ms": 3_000.0, "tpot_p99_ms": 80.0},
        "interactive": {"ttft_p99_ms": 2_000.0, "tpot_p99_ms": 15.0},
    },
}
SAMPLES = {  # performance_sample_count_override
    "llama2-70b": 24_576,
    "llama3_1-8b": 13_368,
    "llama3_1-405b": 8_313,
    "deepseek-r1": 4_388,
    "gpt-oss-120b": 6_396,
}
MAX_TOKENS = {"llama3_1-8b": 128, "llama3_1-405b": 2_000, "deepseek-r1": 20_000,
              "gpt-oss-120b": 10_240}  # fmt: skip
# Built-in H200 profiles (FP8 TensorRT-LLM; GPT-OSS-120B ships MXFP4 weights): GPUs
# per engine from the weights' size in FP8 against 141 GB per H200 (8B and 120B fit
# one; 405B and DeepSeek-R1's 671B need a whole 8-GPU box).
H200 = {  # profile name -> (MLPerf model, GPUs, precision)
    "h200-llama3.1-8b": ("llama3_1-8b", 1, "fp8"),
    "h200-llama3.1-405b": ("llama3_1-405b", 8, "fp8"),
    "h200-deepseek-r1": ("deepseek-r1", 8, "fp8"),
    "h200-gpt-oss-120b": ("gpt-oss-120b", 1, "mxfp4"),
}

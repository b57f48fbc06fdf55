"""A stand-in for the parts of TensorRT-LLM 1.2.x that pytest-tokperf's adapter touches.

TensorRT-LLM cannot be installed on machines without CUDA, so the adapter's tests run
against this. It mirrors, by name, signature and behaviour, what the adapter uses of
NVIDIA/TensorRT-LLM (1.2.x):
- tensorrt_llm/__init__.py: `LLM`, `SamplingParams`, `__version__`
- tensorrt_llm/llmapi/llm.py: `LLM(model, tokenizer=None, tensor_parallel_size=1,
  pipeline_parallel_size=1, **kwargs)`, `.tokenizer.apply_chat_template(...)`,
  `.generate_async(inputs, sampling_params=None, streaming=False)`, `.shutdown()`
- tensorrt_llm/llmapi/llm_args.py: `KvCacheConfig(free_gpu_memory_fraction=...)`
- tensorrt_llm/sampling_params.py: `SamplingParams` fields and its `_greedy_decoding`
  rule (top_k None or 1 and top_p None or 0)
- tensorrt_llm/executor/result.py: `CompletionOutput` with `token_ids`, `text`,
  `length`, `token_ids_diff`, `text_diff`, `finish_reason`; a streamed result is async
  iterable and updates `_last_token_ids_len` / `_last_text_len` before each step.
Generation is a deterministic function of the prompt; every third step delivers two
tokens at once, as an engine with a stream interval or speculative decoding does.
"""

from __future__ import annotations

from tensorrt_llm.llmapi import LLM, KvCacheConfig  # noqa: F401
from tensorrt_llm.sampling_params import SamplingParams  # noqa: F401

__version__ = "1.2.0rc0+standin"

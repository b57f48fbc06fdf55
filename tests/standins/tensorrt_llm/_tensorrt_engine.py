"""Mirror of tensorrt_llm/_tensorrt_engine: the LLM class for prebuilt TensorRT engines."""

from __future__ import annotations

from tensorrt_llm.llmapi import LLM as _PyTorchLLM


class LLM(_PyTorchLLM):
    backend = "tensorrt"

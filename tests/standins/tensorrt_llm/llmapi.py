"""Mirror of tensorrt_llm/llmapi (1.2.x): LLM, KvCacheConfig, and the streamed result.

Like the real classes, `LLM(...)` rejects keywords `LlmArgs` does not know (the real
one is a pydantic model that forbids extra fields; the list here is the subset a
caller of this project could mean), `KvCacheConfig` is strict, and `generate_async`
takes a prompt as text or as token ids.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorrt_llm.sampling_params import SamplingParams

CREATED: list[LLM] = []  # every LLM the stand-in built, for the tests to inspect


@dataclass(kw_only=True)
class KvCacheConfig:  # a StrictBaseModel upstream: unknown fields raise
    enable_block_reuse: bool = True  # upstream's default; trtllm-bench turns it off
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = None


# LlmArgs fields (tensorrt_llm/llmapi/llm_args.py) beyond LLM's named parameters
LLM_ARGS = {
    "pipeline_parallel_size",
    "context_parallel_size",
    "gpus_per_node",
    "moe_expert_parallel_size",
    "enable_attention_dp",
    "kv_cache_config",
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "max_input_len",
    "max_beam_width",
    "enable_chunked_prefill",
    "scheduler_config",
    "cuda_graph_config",
    "build_config",
    "backend",
    "speculative_config",
}


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]


class RequestOutput:
    """The streamed result: async iteration yields itself after each decoding step."""

    def __init__(self, prompt: str | list[int], params: SamplingParams) -> None:
        self.prompt = prompt
        self.sampling_params = params
        self.outputs = [CompletionOutput(0)]
        key = prompt if isinstance(prompt, str) else ",".join(map(str, prompt))
        digest = hashlib.sha256(key.encode()).digest()
        # as long as max_tokens allows, or a prompt-dependent "EOS" before that unless
        # ignore_eos says to generate the full length
        eos_at = 5 + digest[0] % 20
        self._planned = params.max_tokens if params.ignore_eos else min(params.max_tokens, eos_at)
        self._ids = [100 + b for b in digest] * 8
        self.finished = False

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        out = self.outputs[0]
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)  # one engine step
        out._last_token_ids_len = len(out.token_ids)
        out._last_text_len = len(out.text)
        step = 2 if len(out.token_ids) % 3 == 2 else 1
        new = self._ids[len(out.token_ids) : min(len(out.token_ids) + step, self._planned)]
        out.token_ids.extend(new)
        if self.sampling_params.detokenize:
            out.text += "".join(f" t{t}" for t in new)
        if len(out.token_ids) >= self._planned:
            self.finished = True
            out.finish_reason = (
                "length" if self._planned == self.sampling_params.max_tokens else "stop"
            )
        return self


class _Tokenizer:
    """Byte-level: id = byte + 3; 1 is BOS, which `encode` prepends by default."""

    def __init__(self) -> None:
        self.calls = 0  # how often the tokenizer ran (the hot path must not call it)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        return ([1] if add_special_tokens else []) + [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str | list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        text += "<|assistant|>" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


class LLM:
    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        extra = sorted(set(kwargs) - LLM_ARGS)
        if extra:  # pydantic's message for a model that forbids extra fields
            raise ValueError(f"{extra[0]}: Extra inputs are not permitted")
        if not Path(model).exists():
            raise ValueError(f"model path {model} does not exist")
        self.model = model
        self.args = {
            "tokenizer": tokenizer,
            "skip_tokenizer_init": skip_tokenizer_init,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": 1,
            "context_parallel_size": 1,
            **kwargs,
        }
        self.tokenizer = None if skip_tokenizer_init else _Tokenizer()
        self.requests: list[tuple[str | list[int], SamplingParams]] = []
        self.is_shutdown = False
        CREATED.append(self)

    def generate_async(
        self,
        inputs: str | list[int],
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
    ) -> RequestOutput:
        if self.is_shutdown:
            raise RuntimeError("LLM is shut down")
        if isinstance(inputs, str) and self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (skip_tokenizer_init=True)")
        params = sampling_params or SamplingParams()
        self.requests.append((inputs, params))
        return RequestOutput(inputs, params)

    @property
    def world_size(self) -> int:  # ParallelConfig.world_size: tp x pp x cp
        a = self.args
        return a["tensor_parallel_size"] * a["pipeline_parallel_size"] * a["context_parallel_size"]

    def shutdown(self) -> None:
        self.is_shutdown = True

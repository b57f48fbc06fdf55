"""Token counting without the server's usage: a local tokenizer or the server's own.

In this order: a tokenizer the user names (a GGUF file, or a Hugging Face
tokenizer.json); the served model's own, where this machine has it (`find_tokenizer`);
the server's own tokenize endpoint (vLLM/SGLang `/tokenize`, llama.cpp `/tokenize`,
llama-cpp-python `/extras/tokenize/count`, found when the engine loads).
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf.engines import EngineError, MissingExtraError
from pytest_tokperf.engines.openai.http import _post_json
from pytest_tokperf.engines.openai.stream import StreamError

Counter = Callable[[str], int]


def _checked(counter: Counter, text: str, usage: int) -> int:
    """The server's `usage`, once a user-named tokenizer agrees with it (within 5%, or 2
    tokens): a tokenizer that does not match the served model would miscount."""
    counted = counter(text)
    if abs(counted - usage) > max(2, usage // 20):
        raise StreamError(
            f"the server's usage says {usage} output tokens but the tokenizer counts "
            f"{counted}: check that the tokenizer matches the served model"
        )
    return usage


def _tokens_in(answer: Any) -> int | None:
    if isinstance(answer, dict):
        if isinstance(answer.get("count"), int):
            return int(answer["count"])
        if isinstance(answer.get("tokens"), list):
            return len(answer["tokens"])
    return None


# (path, body) of the tokenize endpoints, in the order they are tried: vLLM and SGLang
# take "prompt", llama.cpp's server "content" (each ignores the other's key), and
# llama-cpp-python serves its own under /extras
ENDPOINTS: tuple[tuple[str, Callable[[str, str], dict[str, Any]]], ...] = (
    ("/tokenize", lambda model, text: {"model": model, "prompt": text, "content": text,
                                       "add_special_tokens": False, "add_special": False}),
    ("/extras/tokenize/count", lambda model, text: {"model": model, "input": text}),
)  # fmt: skip


def server_counter(
    base_url: str, model: str, headers: Mapping[str, str], timeout_s: float
) -> tuple[Counter, str] | None:
    """The server's own tokenize endpoint as a counter, when it has one that works."""
    for path, body in ENDPOINTS:
        url = base_url + path
        try:
            # what the empty text counts (a BOS some endpoints always add) is taken off
            offset = _tokens_in(_post_json(url, body(model, ""), headers, timeout_s))
            if offset is None:
                continue
        except (urllib.error.URLError, OSError, ValueError):
            continue

        def count(text: str, url: str = url, body: Any = body, offset: int = offset) -> int:
            n = _tokens_in(_post_json(url, body(model, text), headers, timeout_s))
            if n is None:
                raise StreamError(f"{url} answered without tokens")
            return n - offset

        return count, f"server tokenize endpoint {path}"
    return None


def file_counter(path: str) -> tuple[Counter, str]:
    """A local tokenizer: a GGUF file (llama.cpp, vocabulary only) or a tokenizer.json."""
    if not os.path.isfile(path):
        raise EngineError(f"tokenizer {path!r} is not a file (a GGUF file or a tokenizer.json)")
    if path.endswith(".json"):
        try:
            import tokenizers
        except ModuleNotFoundError:
            raise MissingExtraError("openai", "openai", "tokenizers") from None
        hf = tokenizers.Tokenizer.from_file(path)
        return (
            lambda text: len(hf.encode(text, add_special_tokens=False).ids),
            f"Hugging Face tokenizer {os.path.basename(path)}",
        )
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise MissingExtraError("openai", "embedded", "llama_cpp") from None
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return (
        lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False)),
        f"GGUF tokenizer {os.path.basename(path)}",
    )


def hub_cache() -> Path:
    """Where the Hugging Face hub keeps what it downloaded (nothing is downloaded here)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "huggingface") / "hub"


def find_tokenizer(names: Sequence[object], hub: Path) -> str | None:
    """The served model's own tokenizer, where this machine has it: the names the
    server lists it by (vLLM's `root` is the model's path; llama-cpp-python's `id` is
    its --model unless aliased) as an absolute path to a GGUF file or to a folder with
    a tokenizer.json, else a hub name's tokenizer.json in the Hugging Face cache `hub`.
    """
    for name in names:
        if not isinstance(name, str) or not name:
            continue
        path = Path(name).expanduser()
        if path.is_absolute():
            if path.is_file() and path.suffix.lower() == ".gguf":
                return str(path)
            if (path / "tokenizer.json").is_file():
                return str(path / "tokenizer.json")
            continue
        repo = hub / f"models--{name.replace('/', '--')}"
        try:  # the revision the hub calls main, else any snapshot that has one
            main = [(repo / "refs" / "main").read_text().strip()]
        except OSError:
            main = []
        for snapshot in [*main, *sorted(p.name for p in (repo / "snapshots").glob("*"))]:
            found = repo / "snapshots" / snapshot / "tokenizer.json"
            if found.is_file():
                return str(found)
    return None


def model_counter(entry: Mapping[str, Any], hub: Path) -> tuple[Counter, str] | None:
    """A counter from the served model's own tokenizer (`find_tokenizer`), when one is
    found and loads (its library installed); None otherwise."""
    path = find_tokenizer([entry.get("root"), entry.get("id")], hub)
    if path is None:
        return None
    try:
        counter, name = file_counter(path)
    except EngineError:  # a missing library, a file it cannot read: the next way counts
        return None
    return counter, f"{name} (the served model's)"

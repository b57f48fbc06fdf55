"""Prompt sets: the built-in ones shipped with the package, and JSONL files.

A JSONL line is `{"id": str, "prompt": str, "max_tokens"?: int, "reference"?: str}`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pytest_tokperf.engines import Request

BUILTIN = ("default",)
# MLPerf Inference Llama-2-70B's dataset: 24,576 OpenOrca samples (mlcommons/inference,
# language/llama2-70b/README.md)
MLPERF_OPENORCA = "mlperf-openorca"
MAKE_OPENORCA = (
    "python -m pytest_tokperf convert-openorca "
    "open_orca_gpt4_tokenized_llama.sampled_24576.pkl openorca.jsonl --allow-pickle"
)


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    max_tokens: int | None = None
    reference: str | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: tuple[Prompt, ...]

    def requests(
        self,
        count: int,
        max_tokens: int | None,
        default_max_tokens: int,
        *,
        detokenize: bool = True,
    ) -> list[Request]:
        """`count` requests cycling through the prompts.

        `max_tokens`, when given, overrides each prompt's own; otherwise a prompt
        without one gets `default_max_tokens`. `detokenize` False: no text is needed.
        """
        if count < 1:
            raise ValueError(f"requests must be at least 1, got {count}")
        endless = self.endless(max_tokens, default_max_tokens, detokenize=detokenize)
        return list(itertools.islice(endless, count))

    def endless(
        self, max_tokens: int | None, default_max_tokens: int, *, detokenize: bool = True
    ) -> Iterator[Request]:
        """The same requests as `requests`, without end (a run bounded by time takes them)."""
        for i, p in enumerate(itertools.cycle(self.prompts)):
            yield Request(
                id=p.id if i < len(self.prompts) else f"{p.id}#{i // len(self.prompts)}",
                prompt=p.prompt,
                max_tokens=max_tokens or p.max_tokens or default_max_tokens,
                detokenize=detokenize,
            )


class WorkloadError(ValueError):
    """A workload could not be read; the message names the file and line."""


def _prompt(obj: object, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"id", "prompt", "max_tokens", "reference"})
    if unknown:
        raise WorkloadError(
            f"{where}: unknown keys {', '.join(unknown)}; "
            "allowed: id, prompt, max_tokens, reference"
        )
    for key in ("id", "prompt"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise WorkloadError(f"{where}: {key!r} must be a non-empty string")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise WorkloadError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise WorkloadError(f"{where}: 'reference' must be a string, got {reference!r}")
    return Prompt(obj["id"], obj["prompt"], max_tokens, reference)


def json_lines(
    text: str, source: str, error: type[ValueError] = WorkloadError
) -> Iterator[tuple[int, str, object]]:
    """(line number, "source:line", object) of each non-blank JSON line; `error` says
    which line is not JSON."""
    # JSON Lines end lines at "\n" only: str.splitlines would also split inside JSON
    # strings at U+2028, U+0085 and the like, which JSON leaves unescaped
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, deep nesting
            raise error(f"{where}: not a usable JSON line ({exc})") from None
        yield number, where, obj


def parse_jsonl(text: str, source: str) -> tuple[Prompt, ...]:
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, where, obj in json_lines(text, source):
        prompt = _prompt(obj, where)
        if prompt.id in seen:
            raise WorkloadError(
                f"{where}: duplicate id {prompt.id!r} (first on line {seen[prompt.id]})"
            )
        seen[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise WorkloadError(f"{source}: no prompts")
    return tuple(prompts)


def shared_prefix(
    groups: int, prefix_tokens: int, suffix_tokens: int, per_group: int = 4, seed: int = 0
) -> Workload:
    """`groups` shared prefixes (a system prompt, a document) of `prefix_tokens`, each
    followed by `per_group` suffixes of `suffix_tokens` of their own: what a prefix
    cache serves. Both are one-token words (trace.WORDS: one token each in SmolLM2's
    and other GPT-2-style vocabularies). Prompts go round the groups (g0, g1, ..., g0,
    ...), so consecutive requests share a prefix only with `groups=1`."""
    from pytest_tokperf import trace

    for name, value, least in (("groups", groups, 1), ("prefix_tokens", prefix_tokens, 1),
                               ("suffix_tokens", suffix_tokens, 1),
                               ("per_group", per_group, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"workloads.shared_prefix({name}={value!r}): expected an integer >= 1")
    prompts = tuple(
        Prompt(
            f"g{g}-{i}",
            trace.words_text(f"prefix:{seed}:{g}", prefix_tokens)
            + trace.words_text(f"suffix:{seed}:{g}:{i}", suffix_tokens),
        )
        for i in range(per_group)
        for g in range(groups)
    )
    name = (
        f"shared_prefix(groups={groups}, prefix_tokens={prefix_tokens}, "
        f"suffix_tokens={suffix_tokens})"
    )
    return Workload(name, prompts)


def load(workload: str | Path | Workload | None) -> Workload:
    """A built-in set by name (None: "default"), a JSONL file by path, or a Workload."""
    if isinstance(workload, Workload):
        return workload
    name = "default" if workload is None else str(workload)
    if name in BUILTIN:
        text = resources.files("pytest_tokperf").joinpath(f"data/{name}.jsonl").read_text("utf-8")
        return Workload(name, parse_jsonl(text, f"built-in workload {name!r}"))
    path = Path(name)
    if not path.is_file():
        raise WorkloadError(
            f"workload {name!r} is neither a built-in set ({', '.join(BUILTIN)}) "
            "nor an existing JSONL file"
        )
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return Workload(str(path), parse_jsonl(text, str(path)))


def profile_dataset(
    profile: str, dataset: str | None, defined_in: str, given: tuple[str, str] | None
) -> tuple[Path | None, str | None]:
    """(the workload a run without one measures, why it is missing) for a profile.

    `given` is (path, where it came from) of --tokperf-dataset; `dataset` the profile's
    key: a JSONL path (relative to the file defining the profile) or a name. None, None:
    the built-in set. A given path that does not exist raises WorkloadError.
    """
    if given is not None:
        path = Path(given[0])
        if not path.is_file():
            raise WorkloadError(f"dataset {given[0]!r} (from {given[1]}) is not a file")
        return path, None
    if dataset is None:
        return None, None
    path = Path(dataset)
    if not path.is_absolute() and defined_in != "built-in":
        path = Path(defined_in).parent / path
    if path.is_file():
        return path, None
    what = (
        "the MLPerf OpenOrca set (24,576 samples, EOS honoured)"
        if dataset == MLPERF_OPENORCA
        else f"the dataset {dataset!r}"
    )
    how = (
        f"make its JSONL once from MLPerf's pickle with `{MAKE_OPENORCA}`, then"
        if dataset == MLPERF_OPENORCA
        else "then"
    )
    return None, (
        f"profile {profile!r}: its floors were measured on {what}, which is not here; "
        f"{how} pass --tokperf-dataset PATH (env TOKPERF_DATASET, ini tokperf_dataset). "
        "The built-in prompts would not be comparable"
    )

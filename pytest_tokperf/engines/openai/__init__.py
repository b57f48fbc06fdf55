"""Any OpenAI-compatible server (trtllm-serve, vLLM, SGLang, llama.cpp), streamed over HTTP.

The client is a small HTTP/1.1 `asyncio.Protocol` with a keep-alive pool per event
loop, because the per-token cost of a general HTTP library is several times what
timing needs (benchmarks/client_overhead.py measures it against a raw-socket floor).
Each socket read is handed to the driver as it happens, with the number of SSE `data:`
events it holds (one `bytes.count`): no JSON is parsed per event. JSON is parsed for
the events before the first token (a role-only delta is not a token), for the last
events (usage, errors, `[DONE]`), and for all events only when the text is wanted.

A request ends at the read that ended its body, stamped in that read; whatever
follows (parsing, counting) comes after the stamp.

Output tokens come from the server's `usage` (asked for with
`stream_options.include_usage`). Without it they are counted from the text, in this
order: a tokenizer the user names (a GGUF file, or a Hugging Face tokenizer.json); the
served model's own, where this machine has it (`find_tokenizer`); the server's own
tokenize endpoint (vLLM/SGLang `/tokenize`, llama.cpp `/tokenize`, llama-cpp-python
`/extras/tokenize/count`, found when the engine loads). Such a count is taken after
the run (`Completion.count`): a round trip to a busy server, queued behind the other
requests' generation, must not delay the next request. The per-read counts are then
settled to that total (`reconcile`).

The wing: `http.py` (the client: connections, the pool, timeouts), `stream.py` (SSE
event parsing), `tokens.py` (counting without usage), `engine.py` (`OpenAIEngine` and
`load`, which the engine registry calls by this package's dotted name). The names
other modules use are re-exported here.
"""

from __future__ import annotations

from pytest_tokperf.engines.openai.engine import SETTINGS, OpenAIEngine, load
from pytest_tokperf.engines.openai.http import MAX_CONNECTIONS, Timeouts
from pytest_tokperf.engines.openai.stream import StreamError
from pytest_tokperf.engines.openai.tokens import (
    Counter,
    file_counter,
    find_tokenizer,
    hub_cache,
    model_counter,
    server_counter,
)

__all__ = [
    "MAX_CONNECTIONS",
    "SETTINGS",
    "Counter",
    "OpenAIEngine",
    "StreamError",
    "Timeouts",
    "file_counter",
    "find_tokenizer",
    "hub_cache",
    "load",
    "model_counter",
    "server_counter",
]

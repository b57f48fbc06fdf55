"""A loopback OpenAI-compatible server that misbehaves on request, for the error paths.

The prompt picks the behaviour: ok, multi, nousage, http500, cut, badjson, stall,
nodone, error_event, slowfirst, slow1.5, role, fewer. Run: python fake_openai_server.py --port N
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

SEEN: dict[str, str | int] = {}
STREAMED = [0]  # output tokens sent in usage events, for the /metrics page
MODEL: dict[str, str] = {}  # --root: more of the model's entry in /v1/models
PAGE: dict[str, object] = {}  # --metrics: a recorded page, its counters moved by STREAMED


def event(text: str, completions: bool = False) -> bytes:
    choice = {"index": 0, "text": text} if completions else {"index": 0, "delta": {"content": text}}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def usage(tokens: int) -> bytes:
    STREAMED[0] += tokens
    body = {"choices": [], "usage": {"completion_tokens": tokens, "prompt_tokens": 5}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def models(request: web.Request) -> web.Response:
    model = {"id": "fake", "object": "model", **MODEL}
    return web.json_response({"object": "list", "data": [model]})


async def seen(request: web.Request) -> web.Response:
    return web.json_response(SEEN)


async def chat(request: web.Request) -> web.StreamResponse:
    SEEN["authorization"] = request.headers.get("Authorization", "")
    body = await request.json()
    prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    completions = "messages" not in body
    SEEN[f"sent {prompt}"] = int(SEEN.get(f"sent {prompt}", 0)) + 1  # how often asked
    if prompt == "http500":
        return web.Response(status=500, text="boom: the engine is on fire")
    if prompt.startswith("slowfirst"):
        await asyncio.sleep(30)
    if prompt.startswith("slow1.5"):
        await asyncio.sleep(1.5)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if prompt == "role":  # a role-only delta at once, the first token later: not a token
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await response.write(b"data: " + json.dumps(role).encode() + b"\n\n")
        await asyncio.sleep(0.3)
    if prompt == "fewer":  # 4 text events, usage 3 (a detokenizer's split): no negative count
        for text in ("one", " two", " thr", "ee"):
            await response.write(event(text))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await response.write(usage(3))
        await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
        return response
    if prompt == "badjson":
        await response.write(event("one") + b"data: {not json\n\n")
        return response
    if prompt == "error_event":
        await response.write(b'data: {"error": {"message": "overloaded"}}\n\n')
        return response
    await response.write(event("one", completions) + event(" two", completions))
    if prompt == "cut":
        assert request.transport is not None
        request.transport.close()  # mid-stream, no [DONE]
        return response
    if prompt == "stall":
        await asyncio.sleep(30)
    if prompt == "mismatch":
        await response.write(event(" three four five six seven eight nine ten eleven twelve"))
        await response.write(usage(3) + b"data: [DONE]\n\n")
        return response
    await response.write(event(" three", completions))
    if prompt == "nousage":
        await response.write(b"data: [DONE]\n\n")
        return response
    # "multi": a server that sends several tokens per event; its usage says so
    await response.write(usage(5 if prompt == "multi" else 3))
    if prompt != "nodone":
        await response.write(b"data: [DONE]\n\n")
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


TOKEN_COUNTERS = ("vllm:generation_tokens_total", "sglang:generation_tokens_total",
                  "llamacpp:tokens_predicted_total")  # fmt: skip
QUEUES = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")


async def metrics(request: web.Request) -> web.Response:
    """The recorded page with its generated-token counter advanced by what was streamed
    (times --metrics-scale) and its queue gauge set to --metrics-queue."""
    lines = []
    for line in str(PAGE["text"]).splitlines():
        name, _, value = line.rpartition(" ")
        series = name.split("{")[0]
        if series in TOKEN_COUNTERS:
            line = f"{name} {float(value) + STREAMED[0] * float(str(PAGE['scale']))}"
        elif series in QUEUES:
            line = f"{name} {PAGE['queue']}"
        lines.append(line)
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics", help="serve this recorded /metrics page")
    parser.add_argument("--metrics-scale", type=float, default=1.0)
    parser.add_argument("--metrics-queue", type=float, default=0.0)
    parser.add_argument("--root", help="list the model with this root (vLLM: its path)")
    args = parser.parse_args()
    if args.root:
        MODEL["root"] = args.root
    if args.metrics:
        with open(args.metrics) as page:
            PAGE.update(text=page.read(), scale=args.metrics_scale, queue=args.metrics_queue)
    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/v1/models", models),
            web.get("/seen", seen),
            *([web.get("/metrics", metrics)] if args.metrics else []),
            web.post("/v1/chat/completions", chat),
            web.post("/v1/completions", chat),
        ]
    )
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()

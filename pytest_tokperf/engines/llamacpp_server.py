"""`python -m pytest_tokperf.engines.llamacpp_server ARGS`: llama-cpp-python's
OpenAI-compatible server (`python -m llama_cpp.server ARGS`, the same arguments) with
the embedded engine's choice of llama.cpp's extra buffer types.

llama.cpp's AMX buffer type repacks Q4 weights at load and then segfaults in decode on
AMX Xeons (ggml-org/llama.cpp#20824); `python -m llama_cpp.server` has no option to
turn it off, so on such a machine its first chat answer kills the server. This
launcher loads the model as the embedded engine does (`llamacpp.choose_extra_bufts`:
off where AMX is present) and says so on stderr. `--extra_bufts auto|true|false`
(this launcher's one argument of its own, taken out before the server sees the rest)
overrides the automatic choice.
"""

from __future__ import annotations

import runpy
import sys

from pytest_tokperf.engines.llamacpp import _model_params, choose_extra_bufts


def own_argument(argv: list[str]) -> tuple[str, list[str]]:
    """(the --extra_bufts value, default auto; the server's arguments without it)."""
    rest, value = [], "auto"
    args = iter(argv)
    for arg in args:
        if arg == "--extra_bufts":
            value = next(args, "")
            if value in ("", "--") or value.startswith("--"):
                raise SystemExit(
                    "python -m pytest_tokperf.engines.llamacpp_server: --extra_bufts needs "
                    "a value: auto, true or false"
                )
        elif arg.startswith("--extra_bufts="):
            value = arg.partition("=")[2]
        else:
            rest.append(arg)
    return value, rest


def main() -> None:
    value, sys.argv[1:] = own_argument(sys.argv[1:])
    use, why = choose_extra_bufts(value)
    print(f"tokperf: llama.cpp extra buffer types {'on' if use else 'off'}: {why}",
          file=sys.stderr, flush=True)  # fmt: skip
    with _model_params(use_extra_bufts=use):
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

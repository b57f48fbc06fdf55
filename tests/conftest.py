"""Shared test setup.

pytester's in-process runs drop modules first imported inside them; numpy (under
llama_cpp) cannot be imported twice in one process, so import it here, once.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401

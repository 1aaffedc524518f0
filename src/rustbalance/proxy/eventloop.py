"""Which asyncio event loop the process runs: uvloop for http mode, the stock one otherwise.

http mode spends most of its time in the event loop itself (a readiness callback and a write
per message), where uvloop (libuv) is markedly faster than the stock selector loop. tcp mode
keeps the stock loop: its zero-copy relay registers the transports' own descriptors through
the selector loop's internals (:mod:`.relay`), which uvloop does not have, and that relay is
already faster than any loop could make the stream one. ``RUSTBALANCE_EVENT_LOOP=asyncio``
forces the stock loop (a fallback in case uvloop misbehaves somewhere); a missing uvloop
falls back too.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

ENV_VAR = "RUSTBALANCE_EVENT_LOOP"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(mode: str, environ: Mapping[str, str] | None = None) -> LoopFactory | None:
    """uvloop's ``new_event_loop`` for http mode; None (the stock loop) for tcp mode, when
    the environment asks for ``asyncio``, or when uvloop cannot be imported."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV_VAR, "").strip().lower()
    if mode != "http" or choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def new_event_loop(mode: str) -> asyncio.AbstractEventLoop:
    factory = loop_factory(mode)
    return factory() if factory is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, mode: str) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks for ``mode``."""
    with asyncio.Runner(loop_factory=loop_factory(mode)) as runner:
        return runner.run(main)

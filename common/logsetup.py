"""Logging for both commands: people-first text lines, or one JSON object per line.

Both formats come from the same logging calls. Each process names itself once (component,
and worker id for workers), so every line says where it came from:

    text: 2025-10-17 13:27:41,129 INFO  Worker 0: Processed 100 records
    json: {"time":"2025-10-17T13:27:41.129Z","level":"info","component":"worker","worker":0,"message":"Worker 0: Processed 100 records"}
"""

from __future__ import annotations

import logging
import sys

import orjson

from .timefmt import rfc3339

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class _Json(logging.Formatter):
    def __init__(self, component: str, worker: int | None):
        super().__init__()
        self.component = component
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": rfc3339(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "worker": self.worker,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class _HarmlessAsyncioWarning(logging.Filter):
    """asyncio (and uvloop) warn on every close of a connection upgraded to TLS by `start_tls`, as
    nats-py upgrades its NATS connections: the stream protocol asks to keep a half-closed socket
    open, which TLS cannot do. Nothing is wrong; the line would follow every TLS drain."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "returning true from eof_received() has no effect when using ssl")


def setup_logging(level: str = "info", fmt: str = "text", *, component: str, worker: int | None = None) -> None:
    """Configure this process's root logger (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json(component, worker))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _HarmlessAsyncioWarning) for f in asyncio_log.filters):
        asyncio_log.addFilter(_HarmlessAsyncioWarning())

"""Logging of a service process: one line per request on ``facemetric.service.access`` and
operational messages on ``facemetric.service``, both to stderr (uvicorn's own access log is
switched off: it would print query strings, where a careless client may have put a key)."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Give the service's loggers a stderr handler once per process (idempotent)."""
    root = logging.getLogger("facemetric.service")
    if any(getattr(h, "_facemetric", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._facemetric = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


__all__ = ["configure_logging"]

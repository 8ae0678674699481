"""The recognition service: the :class:`~facemetric.recognizer.Recognizer` behind HTTP.

``create_app(ServiceSettings(model=..., gallery=...))`` builds the FastAPI app of one
worker process; ``facemetric serve`` runs it with uvicorn (``--workers`` processes, the
model loaded once in each). Keys: :class:`KeyStore` (``facemetric keys``). See
``docs/service.md`` for the endpoints, the key scopes and the limits.

The web parts need the ``serve`` extra (``pip install 'facemetric[serve]'``); names resolve
on first use (PEP 562), so the key store and the settings work without it.
"""

import importlib
from typing import Any

_WHERE = {
    "create_app": "app",
    "create_app_from_env": "app",
    "ApiKey": "keys",
    "InvalidKeyError": "keys",
    "KeyStore": "keys",
    "Scope": "keys",
    "ServiceSettings": "settings",
    "open_gallery": "settings",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'facemetric.service' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"facemetric.service.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ApiKey",
    "InvalidKeyError",
    "KeyStore",
    "Scope",
    "ServiceSettings",
    "create_app",
    "create_app_from_env",
    "open_gallery",
]

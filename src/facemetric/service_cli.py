"""The service commands of ``facemetric``: ``serve`` (the REST API under uvicorn) and
``keys`` (create, list, revoke API keys). Thin: parse, call :mod:`facemetric.service`,
print."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from facemetric.inference.default import DEFAULT

MODEL_HELP = ("a training run folder, checkpoint_*.pt, an exported .onnx file, 'dlib', or "
              "'default' (the installed default model, resolved to its file once at start)")

GALLERY_HELP = "an SQLite gallery file (created if missing) or a postgresql:// URL"
WORKER_HEALTHCHECK_S = 60
"""Seconds a worker may leave the supervisor's ping unanswered before it is replaced."""

KEYS_HELP = "the API key file (default: beside an SQLite gallery, people.db → people.keys.db)"


def _settings(args: argparse.Namespace) -> Any:
    from facemetric.service.settings import ServiceSettings

    model = str(args.model)
    if model == DEFAULT:
        # Resolved here, once: every worker (and every replacement of one) then loads this
        # very file even if another default is installed while the service runs.
        from facemetric.inference.default import resolve_default_model

        model = str(resolve_default_model())
    return ServiceSettings(
        model=model,
        gallery=str(args.gallery),
        keys=args.keys,
        thresholds=args.thresholds,
        person_score=args.score,
        min_face_size=args.min_face,
        **({} if args.max_pixels is None else {"max_pixels": args.max_pixels}),
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_images=args.max_images,
        max_inflight=args.max_inflight,
        max_threads=args.max_threads,
        micro_batch=args.micro_batch,
        batch_max_faces=args.batch_max_faces,
        batch_wait_ms=args.batch_wait_ms,
        liveness=args.liveness,
        liveness_threshold=args.liveness_threshold,
    )


def _check_model(model: str) -> None:
    from pathlib import Path

    if model != "dlib" and not Path(model).exists():
        raise FileNotFoundError(f"no model {model}: pass {MODEL_HELP}")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as err:
        raise ValueError("serving needs the serve extra: pip install 'facemetric[serve]'"
                         ) from err
    from facemetric.service.logs import configure_logging
    from facemetric.service.settings import SETTINGS_ENV

    settings = _settings(args)
    _check_model(settings.model)
    _ = settings.keys_path  # a database URL without --keys fails here, in one line
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    configure_logging()
    common: dict[str, Any] = {
        "host": args.host, "port": args.port, "access_log": False, "log_level": "info",
        "server_header": False, "proxy_headers": False, "timeout_keep_alive": 5,
        "timeout_graceful_shutdown": 10,
    }
    if args.workers == 1:
        from facemetric.service.app import create_app

        app = create_app(settings)  # errors here print as one line (main())
        uvicorn.run(app, **common)
        return 0
    # Several workers: each process imports the factory and builds its own app (and loads
    # its own model) from the settings in the environment.
    # The supervisor pings each worker and replaces one that stays silent this long; a
    # worker loading its model on a busy machine can hold the GIL for seconds (uvicorn's
    # default of 5 s killed starting workers over and over at load average 20). A dead
    # worker is still replaced at once: the ping is only for live, silent ones.
    os.environ[SETTINGS_ENV] = settings.to_json()
    uvicorn.run("facemetric.service.app:create_app_from_env", factory=True,
                workers=args.workers, timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
                **common)
    return 0


def _key_store(args: argparse.Namespace, create: bool) -> Any:
    from facemetric.service.keys import KeyStore, default_keys_path

    if args.keys is None and args.gallery is None:
        raise ValueError("pass --gallery G (the key file lies beside it) or --keys FILE")
    path = args.keys if args.keys is not None else default_keys_path(args.gallery)
    return KeyStore(path, create=create)


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        store = _key_store(args, create=True)
        record, secret = store.create(args.scope, args.collection, args.name)
        if args.json:
            print(json.dumps({**record.to_dict(), "key": secret}, indent=2))
        else:
            bound = f" on collection {record.collection!r}" if record.collection else ""
            print(secret)  # alone on stdout, so that KEY=$(facemetric keys create ...) works
            print(f"created key {record.id} ({record.scope}{bound}) in {store.path}. This is "
                  "the only time the key is shown: store it now. Send it as 'Authorization: "
                  "Bearer <key>' or 'X-API-Key: <key>', never in a URL.", file=sys.stderr)
        return 0
    store = _key_store(args, create=False)
    if args.keys_command == "list":
        keys = store.list()
        if args.json:
            print(json.dumps([k.to_dict() for k in keys], indent=2))
        else:
            for k in keys:
                state = "active" if k.active else f"revoked {k.revoked_at:%Y-%m-%d %H:%M}"
                print(f"{k.id}  {k.scope:<6}  {k.collection or '(all collections)':<20}  "
                      f"{k.created_at:%Y-%m-%d %H:%M}  {state}  {k.name}")
            if not keys:
                print("no keys; create one with `facemetric keys create`")
        return 0
    if args.keys_command == "revoke":
        record = store.revoke(args.key_id)
        print(f"revoked key {record.id} ({record.scope}); every worker refuses it from its "
              f"next request on")
        return 0
    raise ValueError(f"unknown keys command {args.keys_command!r}")


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` and ``keys``."""
    sv = sub.add_parser("serve", help="run the REST recognition service (uvicorn)")
    sv.add_argument("--model", default=DEFAULT, help=f"{MODEL_HELP} (default: {DEFAULT!r})")
    sv.add_argument("--gallery", required=True, help=GALLERY_HELP)
    sv.add_argument("--keys", help=KEYS_HELP)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1,
                    help="worker processes, each with its own copy of the model")
    sv.add_argument("--thresholds", help="a threshold table JSON (default: the model's own)")
    sv.add_argument("--score", choices=("max", "mean"), default="max",
                    help="person score: best template or mean template")
    sv.add_argument("--min-face", type=int, default=32, help="smallest face box side, px")
    sv.add_argument("--max-pixels", type=int, default=None,
                    help="largest image (width × height), checked before decoding "
                         "(default 40 megapixels)")
    sv.add_argument("--max-request-mb", type=float, default=20.0,
                    help="largest request body, MiB")
    sv.add_argument("--max-images", type=int, default=10, help="most images per request")
    sv.add_argument("--max-inflight", type=int, default=8,
                    help="image requests a worker processes at once (the rest wait)")
    sv.add_argument("--max-threads", type=int, default=16,
                    help="handler threads per worker; with PostgreSQL also its most "
                         "connections (plus one)")
    sv.add_argument("--micro-batch", action=argparse.BooleanOptionalAction, default=False,
                    help="embed concurrent requests' faces in one forward pass "
                         "(see docs/service.md for when it helps)")
    sv.add_argument("--batch-max-faces", type=int, default=64)
    sv.add_argument("--batch-wait-ms", type=float, default=0.0,
                    help="how long a batch waits for more requests (0: no added latency)")
    sv.add_argument("--liveness", help="a presentation-attack detector folder (facemetric pad "
                    "train --out): requests may ask for a liveness check")
    sv.add_argument("--liveness-threshold", type=float, help="overrides the detector's own")
    sv.set_defaults(func=_cmd_serve)

    ks = sub.add_parser("keys", help="create, list or revoke API keys of the service")
    ksub = ks.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="make a key (printed once)")
    kc.add_argument("--scope", required=True, choices=("read", "enroll", "admin"),
                    help="read: verify/identify/embed/list; enroll: + add/remove faces and "
                         "persons; admin: + collections and keys")
    kc.add_argument("--collection", help="bind the key to this collection")
    kc.add_argument("--name", default="", help="a label for people")
    kl = ksub.add_parser("list", help="keys (ids, scopes, collections; never secrets)")
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id", help="12 hex digits, as `keys list` shows")
    for p in (kc, kl, kr):
        p.add_argument("--gallery", help="the gallery the key file lies beside")
        p.add_argument("--keys", help=KEYS_HELP)
    for p in (kc, kl):
        p.add_argument("--json", action="store_true", help="print JSON")
    ks.set_defaults(func=_cmd_keys)


__all__ = ["add_service_commands"]

"""Every curl example in docs/service.md, run against a real server — one on an SQLite
gallery and one on a PostgreSQL gallery: each command is parsed (shell quoting,
``$URL``/``$KEY``/``$FACE_ID``, ``$(base64 -w0 FILE)``, ``-X``, ``-H``, ``-F``, ``-d``) and
sent as the equivalent httpx request; each must succeed."""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import Server

from facemetric.service.keys import KeyStore

pytestmark = [pytest.mark.data]

DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def curl_commands(text: str) -> list[str]:
    """The curl commands of the ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip().startswith("curl ")]
    return commands


def to_request(command: str, env: dict[str, str], files: dict[str, Path]) -> dict[str, Any]:
    """httpx keyword arguments equivalent to one curl command."""
    command = re.sub(r"\$\(base64 -w0 ([\w.]+)\)",
                     lambda m: base64.b64encode(files[m.group(1)].read_bytes()).decode(), command)
    for name, value in env.items():
        command = command.replace(f"${name}", value)
    assert "$" not in command.replace("$(", ""), f"unknown variable in {command[:120]}"
    args = shlex.split(command)[1:]
    method, url, headers, form, upload, data = None, None, {}, {}, [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-s":
            i += 1
            continue
        if arg in ("-X", "-H", "-F", "-d"):
            value = args[i + 1]
            if arg == "-X":
                method = value
            elif arg == "-H":
                name, _, val = value.partition(":")
                headers[name.strip()] = val.strip()
            elif arg == "-F":
                name, _, val = value.partition("=")
                if val.startswith("@"):
                    upload.append((name, (val[1:], files[val[1:]].read_bytes())))
                else:
                    form.setdefault(name, []).append(val)
            else:
                data = value
            i += 2
            continue
        assert not arg.startswith("-"), f"unsupported curl option {arg}"
        url = arg
        i += 1
    assert url is not None
    request: dict[str, Any] = {"method": method or ("POST" if data or form or upload
                                                    else "GET"), "url": url,
                               "headers": headers}
    if upload or form:
        request["files"] = upload or None
        request["data"] = form or None
    elif data is not None:
        request["content"] = data.encode()
    return request


@pytest.fixture(params=["sqlite", "postgresql"])
def docs_server(request, tmp_path) -> Iterator[tuple[str, str, str]]:
    """(backend, URL, admin key) of a server: the shared SQLite one, or a new one on a fresh
    PostgreSQL database."""
    if request.param == "sqlite":
        server, keys = request.getfixturevalue("server"), request.getfixturevalue("keys")
        yield "sqlite", server.url, keys.create("admin", name="docs")[1]
        return
    pg_url, model = request.getfixturevalue("pg_url"), request.getfixturevalue("service_model")
    keys = tmp_path / "docs.keys.db"
    srv = Server(model, pg_url, tmp_path / "server.log", args=["--keys", str(keys)]).start()
    try:
        yield "postgresql", srv.url, KeyStore(keys).create("admin", name="docs")[1]
    finally:
        srv.stop()


def test_every_curl_example_in_the_docs_runs(docs_server, lfw_people):
    backend, url, key = docs_server
    commands = curl_commands(DOC.read_text())
    assert len(commands) >= 20
    names = list(lfw_people)
    files = {"ada1.jpg": lfw_people[names[0]][0], "ada2.jpg": lfw_people[names[0]][1],
             "ada3.jpg": lfw_people[names[0]][2], "who.jpg": lfw_people[names[0]][3],
             "charles1.jpg": lfw_people[names[1]][0]}
    env = {"URL": url, "KEY": key, "FACE_ID": "0"}
    seen_paths = set()
    with httpx.Client(timeout=60) as http:
        for command in commands:
            request = to_request(command, env, files)
            r = http.request(**request)
            assert r.is_success, (command[:200], r.status_code, r.text[:1000])
            seen_paths.add((request["method"], re.sub(r"/\d+$", "/{id}", request["url"].split(
                "?")[0].replace(url, ""))))
            body = r.json()
            if request["url"].endswith("/v1/health"):
                assert body["gallery"]["backend"] == backend
            for image in body.get("images", []) if isinstance(body, dict) else []:
                if image.get("face_id") and env["FACE_ID"] == "0":
                    env["FACE_ID"] = str(image["face_id"])
    # every kind of endpoint is shown
    shown = {method for method, _ in seen_paths}
    assert shown == {"GET", "POST", "DELETE"}
    assert {p for _, p in seen_paths} >= {
        "/v1/health", "/v1/verify", "/v1/embed", "/v1/collections", "/v1/keys",
        "/v1/collections/people/identify", "/v1/collections/people/persons", "/v1/cluster"}

"""Keys through a real server: no key, a wrong key, a read key enrolling, a key of
collection A on B, a revoked key, a key in the URL (refused and never logged); scopes;
the ``keys`` commands; the key file stores no secret."""

from __future__ import annotations

import sqlite3

from service_helpers import assert_envelope, unique

from facemetric.cli import main
from facemetric.service.keys import KeyStore


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_wrong_key_and_revoked_key_are_401(client, keys, collection):
    url = f"/v1/collections/{collection}/persons"
    r = assert_envelope(client.get(url), 401, "missing_key")
    assert "keys create" in r["error"]["message"]
    assert client.get(url).headers["www-authenticate"] == "Bearer"
    assert_envelope(client.get(url, headers=_bearer("not-a-key")), 401, "invalid_key")
    _, real = keys.create("read")
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    body = assert_envelope(client.get(url, headers=_bearer(forged)), 401, "invalid_key")
    assert body["error"]["details"] == {"reason": "unknown"}
    assert_envelope(client.get(url, headers={"Authorization": f"Basic {real}"}), 401,
                    "invalid_key")
    # both headers, different keys
    _, other = keys.create("read")
    assert_envelope(client.get(url, headers={**_bearer(real), "X-API-Key": other}), 400,
                    "conflicting_keys")
    # a working key in either header, then revoked: refused from the next request on
    record, key = keys.create("read")
    assert client.get(url, headers=_bearer(key)).status_code == 200
    assert client.get(url, headers={"X-API-Key": key}).status_code == 200
    keys.revoke(record.id)
    body = assert_envelope(client.get(url, headers={"X-API-Key": key}), 401, "invalid_key")
    assert body["error"]["details"] == {"reason": "revoked"}


def test_scopes_form_a_ladder(client, keys, collection, lfw_people):
    photo = next(iter(lfw_people.values()))[0].read_bytes()
    read = _bearer(keys.create("read")[1])
    enroll = _bearer(keys.create("enroll")[1])
    faces = f"/v1/collections/{collection}/persons/Ann/faces"
    # read: may list and identify, may not enroll, delete or create
    assert client.get(f"/v1/collections/{collection}", headers=read).status_code == 200
    body = assert_envelope(client.post(faces, files={"images": photo}, headers=read), 403,
                           "insufficient_scope")
    assert body["error"]["details"] == {"key_scope": "read", "required": "enroll"}
    assert_envelope(client.post(f"/v1/collections/{collection}/persons",
                                json={"name": "Bo"}, headers=read), 403, "insufficient_scope")
    # enroll: may enroll and identify, may not create collections or manage keys
    assert client.post(faces, files={"images": photo}, headers=enroll).status_code == 201
    r = client.post(f"/v1/collections/{collection}/identify", files={"image": photo},
                    headers=read)
    assert r.status_code == 200 and r.json()["faces"][0]["best"] == "Ann"
    assert_envelope(client.post("/v1/collections", json={"name": unique("x")},
                                headers=enroll), 403, "insufficient_scope")
    assert_envelope(client.get("/v1/keys", headers=enroll), 403, "insufficient_scope")
    assert_envelope(client.delete(f"/v1/collections/{collection}/persons/Ann", headers=read),
                    403, "insufficient_scope")
    assert client.delete(f"/v1/collections/{collection}/persons/Ann",
                         headers=enroll).status_code == 200


def test_a_key_bound_to_collection_a_cannot_touch_b(client, keys, admin):
    a, b = unique("a"), unique("b")
    for name in (a, b):
        assert client.post("/v1/collections", json={"name": name}, headers=admin).status_code \
            == 201
    bound_admin = _bearer(keys.create("admin", collection=a)[1])
    bound_read = _bearer(keys.create("read", collection=a)[1])
    assert client.get(f"/v1/collections/{a}/persons", headers=bound_read).status_code == 200
    for method, url in [("GET", f"/v1/collections/{b}"), ("GET", f"/v1/collections/{b}/persons"),
                        ("DELETE", f"/v1/collections/{b}"),
                        ("DELETE", f"/v1/collections/{b}/persons/x")]:
        body = assert_envelope(client.request(method, url, headers=bound_admin), 403,
                               "wrong_collection")
        assert body["error"]["details"] == {"key_collection": a}
    assert_envelope(client.post(f"/v1/collections/{b}/identify", files={"image": b"x"},
                                headers=bound_read), 403, "wrong_collection")
    # listing shows only its own collection; it may make keys for it, not for others
    listed = client.get("/v1/collections", headers=bound_read).json()["items"]
    assert [c["name"] for c in listed] == [a]
    assert_envelope(client.post("/v1/keys", json={"scope": "read"}, headers=bound_admin), 403,
                    "wrong_collection")
    made = client.post("/v1/keys", json={"scope": "read", "collection": a},
                       headers=bound_admin)
    assert made.status_code == 201 and made.json()["collection"] == a
    assert {k["collection"] for k in client.get("/v1/keys", headers=bound_admin).json()[
        "items"]} == {a}
    # b is untouched
    assert client.get(f"/v1/collections/{b}", headers=admin).status_code == 200


def test_key_in_the_url_is_refused_and_never_logged(server, client, keys, collection):
    _, key = keys.create("admin")
    for query in (f"api_key={key}", f"key={key}", f"token={key}", f"x={key}", "access_token=1"):
        r = client.get(f"/v1/collections/{collection}/persons?{query}")
        assert_envelope(r, 400, "key_in_url")
    assert_envelope(client.get(f"/v1/collections/{key}"), 400, "key_in_url")
    assert client.get("/v1/health").status_code == 200  # still up
    log = server.log_text()
    assert key not in log and key.split("_")[1] not in log
    assert "<redacted: key in URL>" in log


def test_keys_over_http_create_list_revoke(client, admin, keys):
    made = client.post("/v1/keys", json={"scope": "enroll", "name": "kiosk"}, headers=admin)
    assert made.status_code == 201
    new = made.json()
    assert new["key"].startswith("fmk_") and new["scope"] == "enroll"
    listed = client.get("/v1/keys", headers=admin).json()["items"]
    assert new["id"] in {k["id"] for k in listed}
    assert all("key" not in k for k in listed)
    assert client.get("/v1/collections", headers=_bearer(new["key"])).status_code == 200
    revoked = client.delete(f"/v1/keys/{new['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert_envelope(client.get("/v1/collections", headers=_bearer(new["key"])), 401,
                    "invalid_key")
    assert_envelope(client.delete("/v1/keys/000000000000", headers=admin), 404, "not_found")


def test_keys_commands_and_the_file_holds_no_secret(tmp_path, capsys):
    gallery = tmp_path / "people.db"
    assert main(["keys", "create", "--scope", "enroll", "--collection", "lfw", "--name", "k1",
                 "--gallery", str(gallery)]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("fmk_") and "only time" in out.err
    store = KeyStore(tmp_path / "people.keys.db", create=False)
    record = store.authenticate(key)
    assert (record.scope, record.collection, record.name) == ("enroll", "lfw", "k1")
    assert (tmp_path / "people.keys.db").stat().st_mode & 0o077 == 0
    raw = (tmp_path / "people.keys.db").read_bytes()
    secret = key.split("_", 2)[2]
    assert secret.encode() not in raw
    with sqlite3.connect(tmp_path / "people.keys.db") as conn:
        salt, digest = conn.execute("SELECT salt, digest FROM api_keys").fetchone()
    assert len(salt) == 16 and len(digest) == 32
    assert main(["keys", "list", "--gallery", str(gallery), "--json"]) == 0
    listing = capsys.readouterr().out
    assert record.id in listing and secret not in listing
    assert main(["keys", "revoke", record.id, "--gallery", str(gallery)]) == 0
    capsys.readouterr()
    assert main(["keys", "revoke", "ffffffffffff", "--gallery", str(gallery)]) == 2
    assert "no key with id" in capsys.readouterr().err
    assert main(["keys", "create", "--scope", "read", "--gallery",
                 "postgresql://u:pw@db/x"]) == 2
    err = capsys.readouterr().err
    assert "--keys FILE" in err and "pw" not in err


def test_serve_refuses_bad_settings_in_one_line(tmp_path, capsys, service_model):
    """Before any model is loaded or port bound."""
    for argv, words in [
        (["--model", str(tmp_path / "nope.onnx"), "--gallery", str(tmp_path / "g.db")],
         "no model"),
        (["--model", str(service_model), "--gallery", "postgresql://u:secret@db/x"],
         "--keys FILE"),
        (["--model", str(service_model), "--gallery", str(tmp_path / "g.db"), "--workers",
          "0"], "--workers"),
        (["--model", str(service_model), "--gallery", str(tmp_path / "g.db"),
          "--max-images", "0"], "max_images"),
    ]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and "secret" not in err, err

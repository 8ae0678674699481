"""Bad input through a real server: corrupt, truncated and empty images, a decompression
bomb's header, a 50 MB body (with and without Content-Length), wrong content types,
malformed base64, unknown fields, too many images, invalid JSON — each answered with a
4xx and the envelope; the server stays up and nothing is stored."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator

import httpx
import pytest
from service_helpers import assert_envelope

from facemetric.gallery import SQLiteGallery

BIG = 50 * 1024 * 1024


def bomb_png(side: int = 30_000) -> bytes:
    """A well-formed PNG *header* for a ``side`` × ``side`` RGB image, with a few bytes of
    pixel data: decoding it would need 2.7 GB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * side) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photo(lfw_people) -> bytes:
    return next(iter(lfw_people.values()))[0].read_bytes()


@pytest.fixture(scope="module")
def bad_images(photo) -> dict[str, bytes]:
    return {
        "corrupt": b"\x00\x01garbage, not an image" * 50,
        "truncated": photo[: len(photo) * 2 // 5],
        "empty": b"",
        "bomb": bomb_png(),
        "text": b"hello",
    }


def _stored(server, collection: str) -> tuple[int, int]:
    """(version, faces) of the collection, read from the gallery file itself."""
    with SQLiteGallery(server.gallery) as g:
        c = g.get_collection(collection)
        return c.version, c.face_count


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "bomb", "text"])
def test_unreadable_images_are_refused_and_nothing_is_stored(
        kind, server, client, admin, collection, bad_images, photo):
    bad = bad_images[kind]
    before = _stored(server, collection)
    faces = f"/v1/collections/{collection}/persons/Zed/faces"
    # multipart and base64 JSON alike
    body = assert_envelope(client.post(faces, files={"images": bad}, headers=admin), 422,
                           "nothing_enrolled")
    assert body["error"]["details"]["images"][0]["problem"] == "unreadable"
    if kind == "bomb":
        assert "too many pixels" in body["error"]["details"]["images"][0]["detail"]
    assert_envelope(client.post(faces, json={"images": [base64.b64encode(bad).decode()]},
                                headers=admin), 422, "nothing_enrolled")
    r = client.post(f"/v1/collections/{collection}/identify", files={"image": bad},
                    headers=admin)
    assert assert_envelope(r, 422, "unreadable_image")["error"]["details"]["problem"] == \
        "unreadable"
    assert_envelope(client.post("/v1/verify", files={"a": photo, "b": bad}, headers=admin), 422,
                    "unreadable_image")
    assert_envelope(client.post("/v1/embed", files={"images": bad}, headers=admin), 422,
                    "unreadable_image")
    assert _stored(server, collection) == before
    assert client.get(f"/v1/collections/{collection}/persons/Zed",
                      headers=admin).status_code == 404
    assert client.get("/v1/health").status_code == 200


def test_partial_success_stores_only_the_good_images(server, client, admin, collection,
                                                     bad_images, lfw_people):
    good = [p.read_bytes() for p in list(lfw_people.values())[1][:2]]
    files = [("images", good[0]), ("images", bad_images["bomb"]), ("images", good[1]),
             ("images", bad_images["truncated"])]
    r = client.post(f"/v1/collections/{collection}/persons/Pat/faces", files=files,
                    data={"policy": "largest"}, headers=admin)
    assert r.status_code == 201, r.text
    out = r.json()
    assert [i["accepted"] for i in out["images"]] == [True, False, True, False], out
    assert [i["problem"] for i in out["images"]] == [None, "unreadable", None, "unreadable"]
    assert (out["accepted"], out["rejected"]) == (2, 2)
    assert _stored(server, collection)[1] == 2


def _big_json() -> Iterator[bytes]:
    yield b'{"a": "'
    block = b"A" * (1024 * 1024)
    for _ in range(BIG // len(block)):
        yield block
    yield b'", "b": ""}'


def test_a_50_mb_body_is_refused_before_it_is_read(server, client, admin):
    peak = server.rss_peak_kb()
    body = b"A" * BIG
    r = client.post("/v1/verify", content=body,
                    headers={**admin, "Content-Type": "application/json"})
    body_json = assert_envelope(r, 413, "request_too_large")
    assert "52,428,800 bytes" in body_json["error"]["message"]
    # no Content-Length (chunked): refused once the limit is passed
    r = client.post("/v1/verify", content=_big_json(),
                    headers={**admin, "Content-Type": "application/json"})
    assert_envelope(r, 413, "request_too_large")
    r = client.post("/v1/embed", files={"images": body}, headers=admin)
    assert_envelope(r, 413, "request_too_large")
    assert client.get("/v1/health").status_code == 200
    grown_mb = (server.rss_peak_kb() - peak) / 1024
    assert grown_mb < 30, f"the server's peak memory grew by {grown_mb:.0f} MB"


def test_wrong_content_types_malformed_bodies_and_unknown_fields(server, client, admin,
                                                                 collection, photo):
    b64 = base64.b64encode(photo).decode()
    before = _stored(server, collection)
    faces = f"/v1/collections/{collection}/persons/Zed/faces"
    cases = [
        # wrong content types
        (client.post("/v1/verify", content=b"a=1", headers={
            **admin, "Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        (client.post(faces, data={"images": b64}, headers=admin), 415,
         "unsupported_media_type"),
        (client.post(faces, content=photo, headers={**admin, "Content-Type": "image/jpeg"}),
         415, "unsupported_media_type"),
        (client.post("/v1/collections", files={"name": b"x"}, headers=admin), 415,
         "unsupported_media_type"),
        # malformed base64 (and a URL instead of an image: never fetched)
        (client.post(faces, json={"images": ["not base64!!"]}, headers=admin), 422,
         "invalid_base64"),
        (client.post("/v1/verify", json={"a": b64, "b": b64[:-3]}, headers=admin), 422,
         "invalid_base64"),
        (client.post(faces, json={"images": ["https://example.com/face.jpg"]},
                     headers=admin), 422, "invalid_base64"),
        # unknown or missing fields, bad option values
        (client.post(faces, json={"images": [b64], "person": "x"}, headers=admin), 422,
         "invalid_request"),
        (client.post(faces, json={"images": [b64], "url": "http://x/y.jpg"}, headers=admin),
         422, "invalid_request"),
        (client.post(faces, files={"images": photo}, data={"path": "/etc/passwd"},
                     headers=admin), 422, "unknown_field"),
        (client.post(faces, files={"photo": photo}, headers=admin), 422, "unknown_field"),
        (client.post(faces, json={"images": []}, headers=admin), 422, "invalid_request"),
        (client.post(f"/v1/collections/{collection}/identify", json={"image": b64, "k": 0},
                     headers=admin), 422, "invalid_request"),
        (client.post(f"/v1/collections/{collection}/identify", files={"image": photo},
                     data={"k": "many"}, headers=admin), 422, "invalid_request"),
        (client.post("/v1/verify", json={"a": b64, "b": b64, "far": 2}, headers=admin), 422,
         "invalid_request"),
        (client.post("/v1/verify", json={"a": b64, "b": b64, "far": 1e-9}, headers=admin),
         422, "far_not_calibrated"),
        (client.post("/v1/verify", json={"a": b64, "b": b64, "policy": "all"}, headers=admin),
         422, "invalid_request"),
        (client.post("/v1/verify", files={"a": photo}, headers=admin), 422, "missing_image"),
        (client.post(faces, files={"images": photo}, data={"metadata": "{oops"},
                     headers=admin), 422, "invalid_request"),
        # not JSON at all
        (client.post(faces, content=b'{"images": [', headers={
            **admin, "Content-Type": "application/json"}), 400, "invalid_json"),
        (client.post("/v1/collections", content=b"[1, 2", headers={
            **admin, "Content-Type": "application/json"}), 400, "invalid_json"),
        # too many images
        (client.post(faces, json={"images": [b64] * 11}, headers=admin), 413,
         "too_many_images"),
        (client.post(faces, files=[("images", photo)] * 11, headers=admin), 413,
         "too_many_images"),
        # unknown endpoint, method, cursor, names
        (client.get("/v1/collections/nope/persons", headers=admin), 404, "not_found"),
        (client.put("/v1/verify", headers=admin), 405, "method_not_allowed"),
        (client.get(f"/v1/collections/{collection}/persons?cursor=zz", headers=admin), 422,
         "invalid_input"),
        (client.get(f"/v1/collections/{collection}/persons?limit=0", headers=admin), 422,
         "invalid_request"),
        (client.post(f"/v1/collections/{collection}/persons", json={"name": " pad "},
                     headers=admin), 422, "invalid_input"),
    ]
    for r, status, code in cases:
        assert_envelope(r, status, code)
    assert _stored(server, collection) == before
    assert client.get("/v1/health").status_code == 200


def test_request_ids_are_echoed_or_made(client):
    r = client.get("/v1/health", headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    made = client.get("/v1/nope", headers={"X-Request-ID": "bad id\twith spaces"})
    assert made.headers["x-request-id"] != "bad id\twith spaces"
    assert made.json()["request_id"] == made.headers["x-request-id"]
    assert "total;dur=" in r.headers["server-timing"]


def test_the_server_never_opens_a_path_a_client_names(client, admin, collection):
    """An image field holding a server path is just bytes that are not an image."""
    r = client.post(f"/v1/collections/{collection}/identify",
                    json={"image": base64.b64encode(b"/etc/passwd").decode()}, headers=admin)
    assert_envelope(r, 422, "unreadable_image")
    r = client.post(f"/v1/collections/{collection}/identify",
                    files={"image": ("/etc/hostname", b"/etc/hostname")}, headers=admin)
    assert_envelope(r, 422, "unreadable_image")


@pytest.mark.parametrize("path", ["/v1/verify", "/v1/embed"])
def test_no_body_at_all(client, admin, path):
    assert_envelope(client.post(path, headers=admin), 415, "unsupported_media_type")
    r = client.post(path, content=b"", headers={**admin, "Content-Type": "application/json"})
    assert_envelope(r, 400, "invalid_json")
    assert isinstance(r, httpx.Response)

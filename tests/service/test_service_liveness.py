"""Liveness through HTTP: ``facemetric serve --liveness FOLDER`` with a real LBP PAD detector
trained on NUAA subjects, probed with photos of a subject it never saw. Every attack score
in an answer equals the detector run directly on the face's context crop (found by dlib,
independently of the service); an attack is refused with its own reason
(``presentation_attack``) by verify, identify and enroll; ``liveness=false`` skips the
check; each answer equals the Python API's (``Recognizer(liveness=...)``); the OpenAPI
document describes the option and the fields; a service without a detector refuses
``liveness=true`` with 422 ``liveness_unavailable``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import Server, assert_envelope, assert_same, unique

from facemetric.recognizer import Recognizer
from facemetric.service.keys import KeyStore

pytestmark = [pytest.mark.data, pytest.mark.slow]

TRAIN = ["0002", "0003", "0005", "0006", "0008", "0009"]
HELD_OUT = "0001"


@pytest.fixture(scope="module")
def detector(nuaa_root: Path) -> Any:
    from facemetric.pad import load_pad_faces, train_lbp

    faces = load_pad_faces(nuaa_root, subjects=TRAIN, per_class=6)
    return train_lbp(faces.crops, faces.is_attack, faces.subjects.tolist())


@pytest.fixture(scope="module")
def photos(nuaa_root: Path, detector: Any) -> dict[str, list[tuple[bytes, float]]]:
    """Held-out live photos the detector passes and spoof photos it catches, with its
    score of each — computed without the service: dlib → largest face → context crop."""
    from facemetric.align.detect import FaceDetector
    from facemetric.data.images import load_image
    from facemetric.recognizer.faces import context_crop

    finder = FaceDetector(upsample=1)
    out: dict[str, list[tuple[bytes, float]]] = {"live": [], "spoof": []}
    for cls in out:
        for path in sorted((nuaa_root / cls / HELD_OUT).glob("*.jpg"))[::8]:
            rgb = load_image(path)
            found = finder.detect(rgb)
            if not found:
                continue
            face = max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            crop, _ = context_crop(rgb, face.box, face.landmarks)
            score = float(detector.score([crop])[0])
            if (score >= detector.threshold) == (cls == "spoof"):
                out[cls].append((path.read_bytes(), score))
    assert len(out["live"]) >= 2 and len(out["spoof"]) >= 2, out
    return out


@pytest.fixture(scope="module")
def live_server(service_model: Path, detector: Any, tmp_path_factory: Any
                ) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("liveness")
    folder = detector.save(tmp / "pad")
    srv = Server(service_model, tmp / "g.db", tmp / "server.log",
                 args=["--liveness", str(folder)]).start()
    key = KeyStore(tmp / "g.keys.db").create("admin")[1]
    yield srv, {"X-API-Key": key}
    srv.stop()


def test_verify_identify_enroll_check_liveness_like_the_python_api(
        live_server, detector, photos, service_model, tmp_path):
    srv, h = live_server
    (live_a, sa), (live_b, sb) = photos["live"][:2]
    spoof, ss = photos["spoof"][0]
    local = Recognizer(service_model, tmp_path / "local.db", collection="c",
                       liveness=detector)
    with httpx.Client(base_url=srv.url, timeout=60, headers=h) as c:
        health = c.get("/v1/health").json()
        assert health["liveness"] is True
        assert health["liveness_threshold"] == pytest.approx(detector.threshold, abs=1e-12)

        # verify: two live photos are compared, each face with its score
        r = c.post("/v1/verify", files={"a": live_a, "b": live_b})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["score"] is not None
        assert body["images"][0]["liveness"] == [pytest.approx(sa, abs=1e-9)]
        assert body["images"][1]["liveness"] == [pytest.approx(sb, abs=1e-9)]
        assert_same(body, local.verify(live_a, live_b).to_dict())

        # an attack: not compared, its own reason, its score and the threshold in the detail
        body = c.post("/v1/verify", json={"a": _b64(live_a), "b": _b64(spoof)}).json()
        assert body["score"] is None and body["same"] is None
        assert body["images"][1]["problem"] == "presentation_attack"
        assert body["images"][1]["liveness"] == [pytest.approx(ss, abs=1e-9)]
        assert f"{ss:.4f}" in body["images"][1]["detail"]
        assert_same(body, local.verify(live_a, spoof).to_dict())

        # liveness=false skips the check (and carries no scores); true is the default here
        body = c.post("/v1/verify", files={"a": live_a, "b": spoof},
                      data={"liveness": "false"}).json()
        assert body["score"] is not None and body["images"][1]["liveness"] is None
        assert_same(body, local.verify(live_a, spoof, liveness=False).to_dict())

        # enroll: the print is refused with its score, the live photo stored
        c.post("/v1/collections", json={"name": "c"}).raise_for_status()
        r = c.post("/v1/collections/c/persons/subject-0001/faces",
                   files=[("images", live_a), ("images", spoof)], data={"policy": "largest"})
        assert r.status_code == 201, r.text
        body = r.json()
        assert [o["accepted"] for o in body["images"]] == [True, False]
        assert body["images"][1]["problem"] == "presentation_attack"
        assert body["images"][0]["liveness"] == pytest.approx(sa, abs=1e-9)
        assert body["images"][1]["liveness"] == pytest.approx(ss, abs=1e-9)
        want = local.enroll("subject-0001", [live_a, spoof], policy="largest").to_dict()
        assert [o["liveness"] for o in body["images"]] == [
            pytest.approx(o["liveness"], abs=1e-9) for o in want["images"]]
        # an enrollment of prints only: 422 nothing_enrolled, the reason per image
        err = assert_envelope(c.post("/v1/collections/c/persons/subject-0001/faces",
                                     files={"images": spoof}), 422, "nothing_enrolled")
        assert err["error"]["details"]["images"][0]["problem"] == "presentation_attack"

        # identify: an attack is never searched; a live face carries its score
        body = c.post("/v1/collections/c/identify", files={"image": spoof}).json()
        assert body["problem"] == "presentation_attack" and body["faces"] == []
        assert body["liveness"] == [pytest.approx(ss, abs=1e-9)]
        assert_same(body, {"collection": "c", **local.identify(spoof).to_dict()})
        body = c.post("/v1/collections/c/identify", files={"image": live_b}).json()
        assert body["faces"][0]["liveness"] == pytest.approx(sb, abs=1e-9)
        assert body["faces"][0]["candidates"][0]["person"] == "subject-0001"
        assert_same(body, {"collection": "c", **local.identify(live_b).to_dict()})
    local.close()


def test_the_openapi_document_describes_liveness(server):
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    for request in ("VerifyRequest", "IdentifyRequest", "EnrollRequest", "VerifyRequestForm",
                    "IdentifyRequestForm", "EnrollRequestForm"):
        assert "liveness" in schemas[request]["properties"], request
    for response in ("VerifyImage", "IdentifyResponse", "IdentifiedFaceOut",
                     "EnrollOutcomeOut"):
        assert "liveness" in schemas[response]["properties"], response
    assert {"liveness", "liveness_threshold"} <= set(schemas["HealthResponse"]["properties"])


def test_without_a_detector_liveness_true_is_refused(server, client, admin, lfw_people):
    photo = next(iter(lfw_people.values()))[0].read_bytes()
    health = client.get("/v1/health").json()
    assert health["liveness"] is False and health["liveness_threshold"] is None
    assert_envelope(client.post("/v1/verify", files={"a": photo, "b": photo},
                                data={"liveness": "true"}, headers=admin),
                    422, "liveness_unavailable")
    name = unique("c")
    client.post("/v1/collections", json={"name": name}, headers=admin).raise_for_status()
    for path, files in ((f"/v1/collections/{name}/identify", {"image": photo}),
                        (f"/v1/collections/{name}/persons/p/faces", {"images": photo})):
        assert_envelope(client.post(path, files=files, data={"liveness": "true"},
                                    headers=admin), 422, "liveness_unavailable")
    # without the option nothing changes: no scores
    body = client.post("/v1/verify", files={"a": photo, "b": photo}, headers=admin).json()
    assert body["images"][0]["liveness"] is None


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()

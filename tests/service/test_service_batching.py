"""The service's encoder wrapper under threads: one forward pass at a time, micro-batching
merges concurrent calls into fewer passes, and every caller gets exactly its own rows
(equal to an unbatched call)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from service_helpers import PixelProjection

from facemetric.inference import ModelContract, TorchEncoder
from facemetric.service.batching import (
    LockedDetector,
    ServiceEncoder,
    request_timings,
    reset_timings,
)


class _Probe(TorchEncoder):
    """A torch encoder that records how many forward passes overlap, and is slow enough
    for requests to pile up."""

    def __init__(self) -> None:
        contract = ModelContract(backbone="pixel_projection", input_size=24,
                                 template="arcface112", embedding_size=16,
                                 weights_sha256="batching-test", flip_test=False)
        super().__init__(PixelProjection(24, 16, 3).eval(), contract, channels_last=False)
        self.running = 0
        self.overlap = 0
        self.calls: list[int] = []
        self._count = threading.Lock()

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        with self._count:
            self.running += 1
            self.overlap = max(self.overlap, self.running)
            self.calls.append(len(faces))
        try:
            time.sleep(0.02)
            return super()._forward(faces)
        finally:
            with self._count:
                self.running -= 1


def _faces(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


@pytest.mark.parametrize("micro_batch", [False, True])
def test_concurrent_calls_get_their_own_rows_one_pass_at_a_time(micro_batch):
    probe = _Probe()
    enc = ServiceEncoder(probe, micro_batch=micro_batch, max_faces=64)
    inputs = [_faces(i, 1 + i % 3) for i in range(16)]
    expected = [probe.embed_faces(x) for x in inputs]
    probe.calls.clear()
    results: dict[int, np.ndarray] = {}
    timings: dict[int, dict[str, float]] = {}
    start = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        reset_timings()
        start.wait()
        results[i] = enc.embed_faces(inputs[i])
        timings[i] = request_timings()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert probe.overlap == 1  # never two forward passes at once
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)
        assert results[i].shape == (len(x), 16)
        assert timings[i]["embed"] > 0
    if micro_batch:
        assert len(probe.calls) < len(inputs)  # requests shared forward passes
        stats = enc.stats.to_dict()
        assert stats["requests"] == len(inputs) and stats["largest"] > 1
        assert max(probe.calls) <= 64
    else:
        assert sorted(probe.calls) == sorted(len(x) for x in inputs)  # one pass per call


def test_a_failing_pass_fails_every_request_in_it_and_the_next_ones_run():
    class Flaky(_Probe):
        fail = True

        def _forward(self, faces: np.ndarray) -> np.ndarray:
            if Flaky.fail:
                time.sleep(0.05)
                raise RuntimeError("boom")
            return super()._forward(faces)

    enc = ServiceEncoder(Flaky(), micro_batch=True)
    errors: list[BaseException] = []

    def call(seed: int) -> None:
        try:
            enc.embed_faces(_faces(seed, 1))
        except RuntimeError as err:
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 6
    Flaky.fail = False
    assert enc.embed_faces(_faces(9, 2)).shape == (2, 16)


def test_the_detector_lock_serialises_detection():
    class Slow:
        running = 0
        overlap = 0

        def detect(self, image: np.ndarray) -> list:
            Slow.running += 1
            Slow.overlap = max(Slow.overlap, Slow.running)
            time.sleep(0.01)
            Slow.running -= 1
            return []

    det = LockedDetector(Slow())
    threads = [threading.Thread(target=det.detect, args=(None,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert Slow.overlap == 1

"""The inference service against a real Mosquitto: scores flow with model versions, hostile events
are dead-lettered, a swap and a rollback under load lose and duplicate nothing, a bad model file
never replaces the last good one, shadow agreement is measured, and a full queue is counted."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.datadir import site_path
from outpost.services.inference.manifest import Manifest, read_manifest, sha256_of, write_manifest
from outpost.services.inference.registry import PACKAGED_MODELS, Registry
from outpost.services.inference.service import InferenceService, run, score_id
from outpost.services.registry import OutpostSettings
from outpost.sketch import from_wire
from tests.conftest import Collector, ServiceThread, wait_status
from tests.conftest import make_event as event

pytestmark = pytest.mark.integration

FRIDGE = "fridge-anomaly"
SHELF = "shelf-stock"
WAIT = 30.0  # generous: wait_for returns as soon as its predicate holds, and CI machines are loaded


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A copy of the shipped models that a test may change."""
    d = tmp_path / "models"
    shutil.copytree(PACKAGED_MODELS, d)
    return d


@pytest.fixture
def isettings(settings: OutpostSettings, models_dir: Path) -> OutpostSettings:
    settings.inference.models_dir = models_dir
    settings.inference.reload_s = 0.1
    settings.inference.backend = {"type": "onnxruntime", "providers": ["cpu"]}  # type: ignore[assignment]
    return settings


def registry(s: OutpostSettings) -> Registry:
    assert s.inference.models_dir is not None
    return Registry(s.inference.models_dir, site_path(s.data_dir, s.site, "inference", "registry.db"))


RunningInference = ServiceThread[InferenceService]


@pytest.fixture
def start_inference(
    isettings: OutpostSettings, broker: Mosquitto
) -> Iterator[Callable[[], RunningInference]]:
    started: list[RunningInference] = []

    def start() -> RunningInference:
        r = ServiceThread(run, isettings).start()
        started.append(r)
        wait_status(isettings, "inference", timeout=WAIT)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


def fridge_step(device: str, step: int, *, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One fridge step as ingest would publish it: four events, the trigger (door) last."""
    base = step * 4
    return [
        event(device, base, "temperature", float(4.0 + rng.normal(0, 0.3))),
        event(device, base + 1, "humidity", float(72 + rng.normal(0, 1))),
        event(device, base + 2, "vibration", float(2.5 + rng.normal(0, 0.5))),
        event(device, base + 3, "door", float(rng.random() < 0.05)),
    ]


def send_shelf(
    publisher: Bus,
    s: OutpostSettings,
    device: str,
    seqs: Iterable[int],
    value: float | Callable[[int], float],
) -> None:
    """One shelf_weight event a message at QoS 1, as ingest publishes a device's events at a low rate."""
    for seq in seqs:
        v = value(seq) if callable(value) else value
        publisher.publish(
            s.topics.events(device), orjson.dumps([event(device, seq, "shelf_weight", v)]), qos=1
        )


def scores(c: Collector) -> list[dict[str, Any]]:
    return c.events()


# --- scores flow ----------------------------------------------------------------------------------


def test_scores_carry_model_version_trace_and_latency(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
) -> None:
    t = isettings.topics
    out = collect(t.root + "/inference/#")
    metrics = collect(t.metrics("inference"))
    start_inference()
    manifest = registry(isettings).manifest(SHELF, registry(isettings).state(SHELF).active or "")
    n = 40
    send_shelf(publisher, isettings, "shelf-001", range(n), lambda seq: 20.0 - seq * 0.3)
    expected = n - (manifest.min_readings - 1)
    assert out.wait_for(lambda c: len(scores(c)) >= expected, WAIT), len(scores(out))
    got = scores(out)
    assert len(got) == expected
    topics = {tp for tp, _ in out.messages}
    assert topics == {t.inference(SHELF, "shelf-001")}
    for s in got:
        assert s["model"] == SHELF and s["version"] == manifest.version
        assert s["label"] in manifest.labels
        assert 0.0 <= s["score"] <= 1.0 and 0.0 <= s["confidence"] <= 1.0
        assert s["alert"] == (s["score"] >= manifest.threshold)
        assert s["trace"] == s["event"] and s["id"] == score_id(SHELF, s["event"])
        assert s["queue_ms"] >= 0 and s["compute_ms"] > 0 and s["batch"] >= 1
        assert s["backend"] == "onnxruntime-cpu"
    # a falling shelf ends low or empty
    assert got[-1]["label"] != manifest.normal_label or got[-1]["score"] > got[0]["score"]
    # infer.{model}.{version}: one record per scored row, its batch's compute time, whose interval
    # sketches add up to the same rows (what the telemetry rolls up per model and version)
    name = f"infer.{SHELF}.{manifest.version}"

    def all_rows(c: Collector) -> bool:
        return any((d["histograms"].get(name) or {}).get("count") == expected for d in c.json())

    assert metrics.wait_for(all_rows, WAIT), metrics.json()[-1]["histograms"]
    batches = metrics.json()
    last = next(d for d in batches if d["histograms"][name]["count"] == expected)
    assert last["counters"]["rows"] == expected
    assert last["histograms"]["compute"]["count"] == last["counters"]["batches"]
    assert last["histograms"][name]["max_ms"] == pytest.approx(
        max(s["compute_ms"] for s in got), rel=0.01, abs=0.002
    )
    upto = batches[: batches.index(last) + 1]
    assert sum(from_wire(d["sketches"][name]).count for d in upto if name in d["sketches"]) == expected


# --- hostile events -------------------------------------------------------------------------------

HOSTILE: list[tuple[str, str, bytes]] = [
    ("not_json", "shelf-001", b"{not json"),
    ("not_json", "shelf-001", b'[{"value": NaN}]'),
    ("not_json", "shelf-001", b"\xff\xfe\x00"),
    ("wrong_shape", "shelf-001", b"[1]"),
    ("wrong_shape", "shelf-001", b'"text"'),
    ("bad_event", "shelf-001", orjson.dumps([{"id": "x", "device": "shelf-001", "metric": "shelf_weight"}])),
    ("bad_event", "shelf-001", orjson.dumps([event("shelf-001", 1, "shelf_weight", "heavy")])),
    ("bad_event", "shelf-001", orjson.dumps([event("shelf-001", 1, "shelf_weight", True)])),
    ("bad_event", "shelf-001", orjson.dumps([event("shelf-001", 1, "shelf_weight", 1.0, ts=-5)])),
    ("bad_event", "shelf-001", orjson.dumps([event("shelf-001", 1, "shelf_weight", 1.0, id="")])),
    ("device_mismatch", "shelf-001", orjson.dumps([event("shelf-002", 1, "shelf_weight", 1.0)])),
    ("bad_topic", "x" * 65, orjson.dumps([event("x" * 65, 1, "shelf_weight", 1.0)])),
    ("bad_topic", "a.b", orjson.dumps([event("a.b", 1, "shelf_weight", 1.0)])),
    ("too_large", "shelf-001", b"[" + b" " * 4_100_000 + b"]"),
    ("not_json", "shelf-001", b"[[" * 2000 + b"]]" * 2000),  # nested beyond what orjson parses
]


def test_hostile_events_are_dead_lettered_and_service_lives_on(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
) -> None:
    t = isettings.topics
    dlq = collect(t.dlq("inference"))
    out = collect(t.root + "/inference/#")
    metrics = collect(t.metrics("inference"))
    r = start_inference()
    for _, device, payload in HOSTILE:
        publisher.publish(f"{t.root}/events/{device}", payload, qos=1)
    # a huge value makes a non-finite statistic: bad_features, not a crash
    send_shelf(publisher, isettings, "shelf-009", range(10), lambda seq: 1e308 * (-1) ** seq)
    want = Counter(h[0] for h in HOSTILE)

    def all_dead_lettered(c: Collector) -> bool:
        # a count of all dead letters could be reached with extra bad_features (several of
        # shelf-009's events may fail) while a hostile one is still on its way: wait per reason
        got = Counter(d["reason"] for d in c.json())
        return got["bad_features"] >= 1 and all(got[reason] >= n for reason, n in want.items())

    assert dlq.wait_for(all_dead_lettered, WAIT), Counter(d["reason"] for d in dlq.json())
    reasons = Counter(d["reason"] for d in dlq.json())
    for reason, n in want.items():
        assert reasons[reason] == n, (reason, reasons)
    assert reasons["bad_features"] >= 1
    for d in dlq.json():
        assert d["stage"] == "inference" and d["payload_len"] > 0 and d["detail"]
    # still scoring, and a replayed event (same id) is scored once
    send_shelf(publisher, isettings, "shelf-002", range(10), 10.0)
    replay = orjson.dumps([event("shelf-002", 9, "shelf_weight", 10.0)])
    publisher.publish(t.events("shelf-002"), replay, qos=1)
    publisher.publish(t.events("shelf-002"), replay, qos=1)
    assert out.wait_for(lambda c: any(s["event"] == "shelf-002-9" for s in scores(c)), WAIT)

    def replays_taken(c: Collector) -> bool:
        return any(d["counters"].get("duplicates", 0) >= 2 for d in c.json())

    # stop only once both replays were taken: a stopping service leaves what arrives for
    # redelivery, and a fixed sleep is not always enough on a loaded machine
    assert metrics.wait_for(replays_taken, WAIT)
    svc = r.stop()
    assert sum(1 for s in scores(out) if s["event"] == "shelf-002-9") == 1
    assert svc.metrics.counters["duplicates"] == 2
    # every rejection was dead-lettered: count after stop, as more bad_features may land late
    assert dlq.wait_for(lambda c: len(c.json()) == svc.metrics.counters["rejected"], WAIT)
    assert svc.bus.stats()["handler_errors"] == 0


# --- hot swap and rollback under load -------------------------------------------------------------


def test_swap_and_rollback_under_load_lose_and_duplicate_nothing(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
) -> None:
    t = isettings.topics
    reg = registry(isettings)
    versions = reg.versions(FRIDGE)
    assert len(versions) >= 2, versions
    old, new = versions[0], versions[1]
    reg.activate(FRIDGE, old)
    out = collect(t.root + f"/inference/{FRIDGE}/+")
    dlq = collect(t.dlq("inference"))
    r = start_inference()
    devices = [f"fridge-{i:03d}" for i in range(10)]
    steps = 1000
    rng = np.random.default_rng(5)
    min_readings = reg.manifest(FRIDGE, old).min_readings

    def load() -> None:
        for step in range(steps):
            for d in devices:
                publisher.publish(t.events(d), orjson.dumps(fridge_step(d, step, rng=rng)), qos=1)
            time.sleep(0.004)  # ~2,500 steps/s offered: 10,000 events/s

    sender = threading.Thread(target=load)
    sender.start()
    assert out.wait_for(lambda c: len(scores(c)) > 200, WAIT)  # scoring under load on the old version
    reg.activate(FRIDGE, new)
    assert out.wait_for(lambda c: sum(s["version"] == new for s in scores(c)) > 200, WAIT)
    assert sender.is_alive(), "the swaps must happen under load: make the stream longer"
    assert reg.rollback(FRIDGE) == old
    assert out.wait_for(lambda c: scores(c)[-1]["version"] == old, WAIT)
    sender.join()
    expected = {f"{d}-{s * 4 + 3}" for d in devices for s in range(min_readings - 1, steps)}
    assert out.wait_for(lambda c: {s["event"] for s in scores(c)} >= expected, WAIT)
    time.sleep(0.3)
    got = scores(out)
    by_event = Counter(s["event"] for s in got)
    assert set(by_event) == expected
    assert max(by_event.values()) == 1, "an event was scored twice"
    used = Counter(s["version"] for s in got)
    assert used[old] > 0 and used[new] > 0, used
    # every device's scores switch version at most twice (old -> new -> old): no interleaving
    for d in devices:
        seq = [
            s["version"]
            for s in sorted(
                (s for s in got if s["device"] == d), key=lambda s: int(s["event"].rsplit("-", 1)[1])
            )
        ]
        switches = sum(1 for a, b in itertools.pairwise(seq) if a != b)
        assert switches <= 2, (d, seq)
    assert dlq.json() == []
    svc = r.stop()
    assert svc.metrics.counters["swaps"] == 2


def test_a_new_release_dropped_into_the_folder_is_served_without_a_restart(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
    models_dir: Path,
) -> None:
    t = isettings.topics
    out = collect(t.root + f"/inference/{SHELF}/+")
    start_inference()
    reg = registry(isettings)
    good = reg.state(SHELF).active or ""

    def send(start: int) -> None:
        send_shelf(publisher, isettings, "shelf-005", range(start, start + 10), 4.0)

    send(0)
    assert out.wait_for(lambda c: len(scores(c)) > 0, WAIT)
    _new_version(models_dir, SHELF, good, "8.0.0")  # the newest release on disk: the default
    deadline = time.monotonic() + WAIT
    seq = 10
    while time.monotonic() < deadline and not any(s["version"] == "8.0.0" for s in scores(out)):
        send(seq)
        seq += 10
        time.sleep(0.3)
    assert any(s["version"] == "8.0.0" for s in scores(out))


def test_a_release_copied_file_by_file_is_served_once_complete(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
    models_dir: Path,
) -> None:
    """``cp -r`` into a running site: the service sees the manifest before the model file, fails
    to load it and marks it bad; once the file is there (the folder's files changed) it tries
    again and serves it."""
    t = isettings.topics
    out = collect(t.root + f"/inference/{SHELF}/+")
    start_inference()
    reg = registry(isettings)
    good = reg.state(SHELF).active or ""
    src, dst = models_dir / SHELF / good, models_dir / SHELF / "8.1.0"
    m = read_manifest(src)
    dst.mkdir()
    write_manifest(dst, m.model_copy(update={"version": "8.1.0"}))  # the manifest first...
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not reg.is_bad(SHELF, "8.1.0"):
        time.sleep(0.1)
    assert reg.is_bad(SHELF, "8.1.0")  # seen half-copied
    time.sleep(0.05)  # a modification time that differs on coarse clocks too
    shutil.copy(src / m.file, dst / m.file)  # ...then the model
    seq = 0
    while time.monotonic() < deadline + WAIT and not any(s["version"] == "8.1.0" for s in scores(out)):
        send_shelf(publisher, isettings, "shelf-006", range(seq, seq + 10), 4.0)
        seq += 10
        time.sleep(0.3)
    assert any(s["version"] == "8.1.0" for s in scores(out))
    assert not reg.is_bad(SHELF, "8.1.0") and "8.1.0" not in reg.bad_versions(SHELF)


# --- bad model files ------------------------------------------------------------------------------


def _new_version(
    models_dir: Path,
    name: str,
    src_version: str,
    version: str,
    blob: bytes | None = None,
    model: onnx.ModelProto | None = None,
) -> None:
    src = models_dir / name / src_version
    dst = models_dir / name / version
    # made complete beside the models folder, then renamed into it in one step, as a release is
    # dropped into a running site: a running service's loader polls the folder, and one it saw
    # half-copied (the source's manifest, no model file yet) would fail to load and be marked bad
    staging = models_dir.parent / "staging" / name / version
    shutil.copytree(src, staging)
    m = read_manifest(src)
    path = staging / m.file
    if blob is not None:
        path.write_bytes(blob)
    if model is not None:
        onnx.save(model, str(path))
    write_manifest(staging, m.model_copy(update={"version": version, "sha256": sha256_of(path)}))
    staging.rename(dst)


def _wrong_shape_model(features: int) -> onnx.ModelProto:
    """A valid ONNX model with two output columns where the manifest promises three labels."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [features, 2], [0.01] * features * 2)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probabilities"]),
        ],
        "wrong",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bad_model_versions_never_replace_the_last_good_one(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
    models_dir: Path,
) -> None:
    t = isettings.topics
    reg = registry(isettings)
    good = reg.state(SHELF).active
    assert good is not None
    features = len(reg.manifest(SHELF, good).features)
    _new_version(models_dir, SHELF, good, "9.0.0", blob=b"this is not an onnx file")
    _new_version(models_dir, SHELF, good, "9.1.0", model=_wrong_shape_model(features))
    _new_version(models_dir, SHELF, good, "9.2.0")
    (models_dir / SHELF / "9.2.0" / "model.onnx").write_bytes(b"tampered after the manifest was written")
    reported = collect(t.control("inference", "reported"))
    out = collect(t.root + f"/inference/{SHELF}/+")
    reg.activate(SHELF, good)
    start_inference()
    # a checksum mismatch is refused before it reaches the service
    from outpost.services.inference.backends.base import ModelLoadError

    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        reg.activate(SHELF, "9.2.0")
    for bad, why in (("9.0.0", "cannot load"), ("9.1.0", "shape")):
        reg.activate(SHELF, bad)  # checksum fine; the content is what is wrong

        def failed(c: Collector, why: str = why) -> bool:
            return any(why in ((d["models"][SHELF] or {}).get("error") or "") for d in c.json())

        assert reported.wait_for(failed, WAIT), reported.json()[-1:]
        assert reg.is_bad(SHELF, bad)
        last = reported.json()[-1]["models"][SHELF]
        assert last["active"] == good
        first = 100 if bad == "9.1.0" else 0
        send_shelf(publisher, isettings, "shelf-003", range(first, first + 10), 5.0)
        assert out.wait_for(lambda c: len(scores(c)) > 0 and scores(c)[-1]["version"] == good, WAIT)
    # rollback skips the versions that failed
    assert reg.rollback(SHELF) == good


# --- shadow ---------------------------------------------------------------------------------------


def test_shadow_scores_alongside_and_is_never_published(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
) -> None:
    t = isettings.topics
    reg = registry(isettings)
    old, new = reg.versions(FRIDGE)[:2]
    reg.activate(FRIDGE, old)
    reg.set_shadow(FRIDGE, new)
    out = collect(t.root + f"/inference/{FRIDGE}/+")
    metrics = collect(t.metrics("inference"))
    start_inference()
    rng = np.random.default_rng(1)
    for step in range(60):
        publisher.publish(
            t.events("fridge-001"), orjson.dumps(fridge_step("fridge-001", step, rng=rng)), qos=1
        )
    assert out.wait_for(lambda c: len(scores(c)) >= 50, WAIT)

    def shadowed(c: Collector) -> bool:
        return any(
            ((d.get("state") or {}).get("models", {}).get(FRIDGE) or {}).get("shadow_agreement") is not None
            for d in c.json()
        )

    assert metrics.wait_for(shadowed, WAIT)
    docs = [
        d
        for d in metrics.json()
        if ((d.get("state") or {}).get("models", {}).get(FRIDGE) or {}).get("shadow_agreement") is not None
    ]
    state = docs[-1]["state"]["models"][FRIDGE]
    assert state["shadow"] == new and state["active"] == old
    assert 0.0 <= state["shadow_agreement"] <= 1.0
    assert {s["version"] for s in scores(out)} == {old}
    last = metrics.json()[-1]
    assert last["counters"][f"shadow_rows.{FRIDGE}"] > 0
    assert last["histograms"]["shadow_compute"]["count"] > 0


def test_a_shadow_with_other_features_and_window_scores_on_its_own_features(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
    models_dir: Path,
) -> None:
    """A candidate that reads other features over a longer window and warms up later: requests
    copy the union of both models' windows, each model computes its own rows, and the active
    model's scores are untouched."""
    t = isettings.topics
    reg = registry(isettings)
    good = reg.state(SHELF).active or ""
    m = reg.manifest(SHELF, good)
    dst = models_dir / SHELF / "5.0.0"
    dst.mkdir()
    onnx.save(_slow_model(2, len(m.labels), width=8), str(dst / "model.onnx"))
    feature = type(m.features[0])
    write_manifest(
        dst,
        m.model_copy(
            update={
                "version": "5.0.0",
                "sha256": sha256_of(dst / "model.onnx"),
                "window": 64,
                "min_readings": 40,
                "features": [
                    feature(metric="shelf_weight", stat="last"),
                    feature(metric="shelf_weight", stat="count"),
                ],
            }
        ),
    )
    reg.activate(SHELF, good)
    reg.set_shadow(SHELF, "5.0.0")
    out = collect(t.root + f"/inference/{SHELF}/+")
    r = start_inference()
    n = 80
    send_shelf(publisher, isettings, "shelf-001", range(n), lambda seq: 20.0 - seq * 0.1)
    expected = n - (m.min_readings - 1)
    assert out.wait_for(lambda c: len(scores(c)) >= expected, WAIT)
    svc = r.stop()
    c = svc.metrics.counters
    assert len(scores(out)) == expected and {s["version"] for s in scores(out)} == {good}
    assert c[f"shadow_rows.{SHELF}"] == n - 39  # from the 40th reading on
    assert c[f"shadow_errors.{SHELF}"] == 0 and c["rejected"] == 0


# --- backpressure ---------------------------------------------------------------------------------


def _slow_model(features: int, labels: int, width: int = 1536) -> onnx.ModelProto:
    """A valid model that takes about a millisecond a row, so the queue surely fills."""
    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, int]) -> onnx.TensorProto:
        return helper.make_tensor(
            name, TensorProto.FLOAT, list(shape), (rng.standard_normal(shape) * 0.01).ravel().tolist()
        )

    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", labels])],
        initializer=[w("w1", (features, width)), w("w2", (width, width)), w("w3", (width, labels))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _activate_slow_version(s: OutpostSettings, models_dir: Path) -> Manifest:
    """Make shelf-stock 9.9.9 a model of the same shape that takes about a millisecond a row."""
    reg = registry(s)
    good = reg.state(SHELF).active or ""
    m = reg.manifest(SHELF, good)
    _new_version(models_dir, SHELF, good, "9.9.9", model=_slow_model(len(m.features), len(m.labels)))
    reg.activate(SHELF, "9.9.9")
    return m


def test_a_burst_beyond_what_is_scored_waits_on_the_broker_and_loses_nothing(
    start_inference: Callable[[], RunningInference],
    collect: Callable[..., Collector],
    publisher: Bus,
    isettings: OutpostSettings,
    models_dir: Path,
) -> None:
    """Backpressure: with a slow model (about a millisecond a row) a burst of separate messages
    far beyond the broker's in-flight window (1,000) is held by the broker, not by the service,
    and every event is scored exactly once, with no dead letter."""
    isettings.inference.max_batch = 8
    m = _activate_slow_version(isettings, models_dir)
    t = isettings.topics
    out = collect(t.root + "/inference/#")
    dlq = collect(t.dlq("inference"))
    r = start_inference()
    n = 2500
    send_shelf(publisher, isettings, "shelf-001", range(n), 9.0)
    expected = n - (m.min_readings - 1)
    assert out.wait_for(lambda c: len(scores(c)) >= expected, 60), len(scores(out))
    svc = r.stop()
    c = svc.metrics.counters
    assert c["full_batches"] > 0
    assert len(scores(out)) == len({s["event"] for s in scores(out)}) == expected
    assert dlq.json() == []

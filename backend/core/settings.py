"""One Settings object for every entry point; environment variables use the RA_ prefix."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RA_")

    data_dir: Path = Path("./data")
    # Empty means: a SQLite file inside data_dir.
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # Access: bound to anything but loopback, the server needs a shared token or named users
    # ("alice:password,bob:password"), and refuses to start without one.
    token: str = ""
    users: str = ""
    secret_key: str = ""  # signs session cookies; empty: a random key per server start
    # Host names the server answers to (comma-separated), besides the loopback names and the bind
    # host; "*": any. A page on another name is refused: a DNS-rebinding site reaches 127.0.0.1
    # under its own name.
    allowed_hosts: str = ""
    cookie_secure: bool = False  # session cookie only over https (set it behind a TLS proxy)
    # Request bodies beyond this are refused (413). The largest real one, 256 typed texts of
    # 4,000 characters, is 12 MB when every character is escaped (\uXXXX pairs, %XX bytes).
    max_body_bytes: int = 16 * 1024 * 1024
    # Seconds a connection has to send a request's headers (backend/web/header_timeout.py): a client
    # that trickles them in would otherwise hold its connection for ever
    header_timeout_s: float = 10.0
    page_size: int = 50
    max_queued_jobs: int = 20  # per author
    max_text_chars: int = 4000  # custom texts and typed evaluation sets, per text
    # Pipeline runs: a config beyond these is refused before any compute (a typo such as
    # training_tokens 1e15 would otherwise hold a worker for years). Raise them for big runs.
    max_training_tokens: int = 1_000_000_000  # sae.training_tokens
    max_sae_width: int = 131_072  # sae.width (latents per layer)
    max_texts: int = 1_000_000  # dataset.n_texts, and the corpus when n_texts is unset
    # Folders a run config queued on the web may read datasets and models from (comma-separated);
    # empty: the data dir and the server's working directory. The CLI reads what its user can.
    input_dirs: str = ""
    # The OpenAI-compatible chat endpoint that explains features (backend/core/llm.py); no base URL: the
    # offline explainer. The key is read from the environment only, never stored with a job.
    llm_base_url: str = ""
    llm_model: str = ""
    llm_api_key: str = ""
    llm_json_mode: Literal["json_object", "schema", "json_schema", "none"] = "json_object"
    llm_max_tokens: int = Field(300, ge=16, le=32_768)
    llm_timeout_s: float = Field(60.0, gt=0, le=3600)

    @property
    def input_roots(self) -> list[Path]:
        named = [Path(d.strip()) for d in self.input_dirs.split(",") if d.strip()]
        return [p.resolve() for p in (named or [self.data_dir, Path.cwd()])]

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def sql_url(self) -> str:
        return _sql_url(self.database_url, self.data_dir, os.getcwd())

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id


@lru_cache(maxsize=64)
def _sql_url(database_url: str, data_dir: Path, cwd: str) -> str:
    # cached: resolve() costs a syscall per part of the path, and every query asks for the URL
    if database_url:
        return database_url
    return f"sqlite:///{(Path(cwd) / data_dir / 'rewardatlas.sqlite').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""One Settings object for every entry point; environment variables use the RA_ prefix."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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
    page_size: int = 50
    max_queued_jobs: int = 20  # per author
    max_text_chars: int = 4000  # custom texts and typed evaluation sets, per text

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def sql_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'rewardatlas.sqlite').resolve()}"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id


@lru_cache
def get_settings() -> Settings:
    return Settings()

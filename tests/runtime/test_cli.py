"""`symbiote run` as a real process: prints its tree, serves, exits 0 within 2 s of a signal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _symbiote() -> list[str]:
    exe = shutil.which("symbiote", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "symbiote.runtime._cli"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_prints_tree_and_stops_on_signal(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [*_symbiote(), "run", "--demo-messages", "2000", "--db", str(tmp_path / "s.duckdb")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "SYMBIOTE_READERS": "2"},
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("serving"):
            break
        assert time.monotonic() < deadline, "".join(seen)
    text = "".join(seen)
    assert "symbiote [supervisor one_for_one] running" in text
    assert "writer [actor] running" in text and "reader-1 [actor] running" in text
    assert "ingested 2,000 demo messages" in text
    t0 = time.monotonic()
    proc.send_signal(signum)
    rc = proc.wait(timeout=10)
    took = time.monotonic() - t0
    assert rc == 0, proc.stdout.read()
    assert took < 2.0


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [*_symbiote(), "run", "--once"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "SYMBIOTE_READERS": "none"},
        timeout=60,
    )
    assert out.returncode == 2
    assert "readers" in out.stderr

"""What a benchmark's result file records about where it ran: the CPU model and the git commit."""
from __future__ import annotations

import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """/proc/cpuinfo's "model name", else ``platform.processor()`` (may be empty), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """``git rev-parse HEAD`` of this checkout (with "+dirty" when tracked files differ), else None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def provenance() -> dict:
    return {"cpu_model": cpu_model(), "git_commit": git_commit()}

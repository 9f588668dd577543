"""How much memory this machine (or its container) gives a process."""
from __future__ import annotations

import os
from pathlib import Path


def gib(size: int) -> str:
    gib = size / 2**30
    return f"{gib:,.1f}" if gib < 1e5 else f"{gib:.1e}"


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total

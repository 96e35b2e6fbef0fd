"""This process's memory as Linux reports it: the resident set now and at its peak.

A measuring aid for the benchmarks and for tests of ``keep_freed_memory`` (which is about what
the resident set does after a free); it lives here, not in ``aat_serve.bench``, so that code
outside the benchmarks can read the resident set without importing them. Every function
returns None (or False) where ``/proc`` is missing.
"""

from __future__ import annotations

import os


def rss_bytes() -> int | None:
    """This process's resident set size now (None where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set size (VmHWM) to the current one; False where unsupported."""
    try:  # writing 5 resets VmHWM, the peak resident set size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The peak resident set size (VmHWM) since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

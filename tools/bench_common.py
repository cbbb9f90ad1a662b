"""What every benchmark script shares: the machine and source description, timing, and writing its
own section of ``BENCHMARKS.md`` between markers."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_INTRO = "Each section is written by the script it names, between its own markers; rerun it to refresh."


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
                 platform.processor() or "unknown CPU")
    vnni = "with" if "avx512_vnni" in cpuinfo or "avx_vnni" in cpuinfo else "without"
    return f"{os.cpu_count()} cores, {model} ({vnni} VNNI), {platform.platform()}"


def source_state() -> str:
    """The git commit and a digest of qinject's sources (which others may be editing meanwhile)."""
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip() or "no git"
    digest = hashlib.sha1()
    for path in sorted([*ROOT.glob("qinject/**/*.py"), *ROOT.glob("passes/*.py")]):
        digest.update(path.read_bytes())
    return f"commit {git}, sources {digest.hexdigest()[:10]}"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the section ``name`` of ``path`` (creating the file or the section if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{FILE_INTRO}\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def median_seconds(sessions: dict, feeds: dict, warmup: int, rounds: int, runs_per_round: int) -> dict[str, float]:
    """Median wall time of one run per session, the sessions interleaved round by round (so load on
    this shared machine hits them alike), after ``warmup`` untimed runs each."""
    import time

    import numpy as np

    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for label, sess in sessions.items():
            for _ in range(runs_per_round):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[label].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec.

    Not ``ru_maxrss``: Linux carries the parent's RSS at fork over into the child's ``ru_maxrss``
    (and ``RUSAGE_CHILDREN`` is a maximum over all children), so a small tool would be charged with
    the benchmark's own memory. ``VmHWM`` belongs to the address space that exec created.
    """
    import resource

    status = Path("/proc/self/status")
    if status.exists():
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS reports bytes

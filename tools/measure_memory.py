"""Run one ``qinject`` command in this process and report its memory on stderr: ``PEAK`` (peak RSS,
KiB, ``bench_common.peak_rss_mib``: not ``ru_maxrss``, which a benchmark holding large arrays would
inflate) and ``ANON`` (peak anonymous memory, KiB, sampled every 20 ms).

RSS counts a file-backed page once per mapping: weights that qinject maps and onnxruntime maps again
count twice although they are one copy in memory. Anonymous memory is what copies and temporaries
cost. Usage: ``python tools/measure_memory.py quantize MODEL -o OUT --calib DATA``.
"""

from __future__ import annotations

import re
import sys
import threading
import time

from bench_common import peak_rss_mib  # tools/ is on sys.path

_peak_anon = [0]


def _sample() -> None:
    while True:
        status = open("/proc/self/status").read()
        _peak_anon[0] = max(_peak_anon[0], int(re.search(r"RssAnon:\s+(\d+)", status).group(1)))
        time.sleep(0.02)


def main() -> int:
    threading.Thread(target=_sample, daemon=True).start()
    from qinject.cli import main as cli

    sys.argv = ["qinject", *sys.argv[1:]]
    try:
        cli()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    print("PEAK", int(peak_rss_mib() * 1024), file=sys.stderr)
    print("ANON", _peak_anon[0], file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

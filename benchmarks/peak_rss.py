"""Run a command and report its wall time and peak resident memory as JSON.

    python benchmarks/peak_rss.py OUT.json -- COMMAND ...

Peak RSS is the child's own (getrusage of the single waited-for child), so
it is the same figure `/usr/bin/time -v` reports as maximum resident set size.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> int:
    out, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit(__doc__)
    start = time.perf_counter()
    code = subprocess.call(command)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out, "w") as fh:
        json.dump({"seconds": round(seconds, 2), "peak_rss_gb": round(peak_kb / 2**20, 3), "exit_code": code}, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Where a stage's process spends the time outside its script's own account: importing before main() and
exiting after it. Runs a workflow script as __main__, then its exit in steps, each timed, on stderr as JSON:

    python benchmarks/process_exit.py workflow/scripts/score_questions.py --model ... --val ... --stats s.json

  main_end_s   process start (the kernel's clock) to the script's return
  atexit_s     Python's atexit handlers (torch's, Triton's)

The rest, the interpreter's finalization (thread joins, the C libraries' exit handlers, CUDA's teardown), is
the total that the shell measures around this program minus main_end_s and atexit_s.

With --skip-finalize the process ends with os._exit after the exit handlers, as a script could.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path


def process_age() -> float:
    """Seconds since this process started, by the kernel's clock (/proc), so the interpreter's start counts."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    skip = sys.argv[1] == "--skip-finalize"
    script, *args = sys.argv[2:] if skip else sys.argv[1:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise
    main_end = process_age()
    start = time.perf_counter()
    atexit._run_exitfuncs()
    report = {"main_end_s": round(main_end, 2), "atexit_s": round(time.perf_counter() - start, 2)}
    print(json.dumps(report), file=sys.stderr, flush=True)
    if skip:
        os._exit(0)


if __name__ == "__main__":
    main()

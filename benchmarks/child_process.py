"""Runs one benchmark measurement in a fresh process and reads back its RESULT line.

Each measurement gets its own process so that imports, compiled programs and peak RSS
(ru_maxrss) belong to it alone. The child prints one line `RESULT {json}`.
"""

import json
import subprocess
import time


def run_child(command, environment):
    """The child's RESULT dict plus `wall_seconds`, or `{"error": ...}` if it printed none."""
    started = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT "):])
            data["wall_seconds"] = time.perf_counter() - started
            return data
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    # A crashed child (llama.cpp's AMX build segfaults here) leaves only log lines behind.
    status = f"exit status {result.returncode}"
    return {"error": f"{status}; last stderr line: {lines[-1]}" if lines else f"{status}, no output"}

"""Run the top-level locustfile.py headless in a subprocess and read its figures.

Shared by experiment/run.py and bench/bench.py, so that both load the
service the same way and count failures by the locustfile's rules.
"""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "locustfile.py"
PROGRESS = "step load: "  # the locustfile's log lines worth showing on the terminal


def run_locust(host, users, spawn_rate, seconds, prefix, options=(), echo=None):
    """Load host with users for seconds; Locust's CSV, HTML and log go to prefix*.

    options are more locust flags (e.g. --timeout, --step-users); echo, when
    given, is called with each progress line of the step load shape.
    Returns the aggregated figures; see read_figures().
    """
    prefix = Path(prefix)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", host, "-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{seconds:g}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", *map(str, options)]
    # cwd: the locustfile's default photo folder is relative to the repository.
    with open(f"{prefix}.log", "w") as log, subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as locust:
        for line in locust.stdout:
            log.write(line)
            if echo and PROGRESS in line:
                echo(line.split(PROGRESS, 1)[1].rstrip())
    # Locust exits 1 when a request failed: that is a finding, not an error.
    if locust.returncode not in (0, 1):
        raise RuntimeError(f"locust exited with {locust.returncode}; see {prefix}.log")
    return read_figures(prefix)


def read_figures(prefix):
    """The 'Aggregated' figures of a run, and the user count at its first failure."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        failing = [row for row in csv.DictReader(f) if int(row["Total Failure Count"] or 0) > 0]
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "avg_ms": round(float(total["Average Response Time"]), 1),
        "p50_ms": _number(total["50%"]),
        "p95_ms": _number(total["95%"]),
        "rps": round(float(total["Requests/s"]), 2),
        "first_failure_users": int(failing[0]["User Count"]) if failing else None,
    }


def _number(text):
    """Locust writes N/A for a percentile of no requests."""
    return None if text == "N/A" else round(float(text))

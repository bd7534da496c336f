"""podlens's performance figures, side by side, from one run.

  1 raw ceiling   decode + detect in a loop, no HTTP, in a pod-sized cgroup
  2 throughput    one pod, --users users, no think time, keep-alive
  3 latency       one pod, one user: what a lone client waits
  4 overload      one pod, --overload-users users: failures, OOM kills, peak memory
  5 cold start    process start to the first 200 from /readyz; memory at idle
  6 scale-out     --scale-pods pods on one port, --scale-users users

Pods are server.py processes in cgroups of --cpu CPUs and --memory-mib MiB
(experiment/pods.py); load comes from locustfile.py (experiment/load.py).
Prints a table and writes JSON to --out.

    python -m bench.bench
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from experiment.load import run_locust
from experiment.pods import Cgroup, Pods, warn_unlimited

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--raw-seconds", type=float, default=float(env("BENCH_RAW_SECONDS", 30)),
        help="1: length of the in-process loop (env BENCH_RAW_SECONDS)")
    add("--users", type=int, default=int(env("BENCH_USERS", 16)), help="2: users (env BENCH_USERS)")
    add("--seconds", type=float, default=float(env("BENCH_SECONDS", 60)),
        help="2: seconds (env BENCH_SECONDS)")
    add("--latency-seconds", type=float, default=float(env("BENCH_LATENCY_SECONDS", 30)),
        help="3: seconds of one user (env BENCH_LATENCY_SECONDS)")
    add("--overload-users", type=int, default=int(env("BENCH_OVERLOAD_USERS", 256)),
        help="4: users (env BENCH_OVERLOAD_USERS)")
    add("--overload-seconds", type=float, default=float(env("BENCH_OVERLOAD_SECONDS", 60)),
        help="4: seconds (env BENCH_OVERLOAD_SECONDS)")
    add("--scale-pods", type=int, default=int(env("BENCH_SCALE_PODS", 3)),
        help="6: pods (env BENCH_SCALE_PODS)")
    add("--scale-users", type=int, default=int(env("BENCH_SCALE_USERS", 48)),
        help="6: users (env BENCH_SCALE_USERS)")
    add("--scale-seconds", type=float, default=float(env("BENCH_SCALE_SECONDS", 60)),
        help="6: seconds (env BENCH_SCALE_SECONDS)")
    add("--timeout", type=float, default=float(env("BENCH_TIMEOUT", 60)),
        help="seconds after which a request counts as failed (env BENCH_TIMEOUT)")
    add("--cpu", type=float, default=float(env("POD_CPU", 0.5)), help="CPUs per pod (env POD_CPU)")
    add("--memory-mib", type=int, default=int(env("POD_MEMORY_MIB", 512)),
        help="memory limit per pod (env POD_MEMORY_MIB)")
    add("--port", type=int, default=int(env("BENCH_PORT", 18081)), help="the pods' port (env BENCH_PORT)")
    add("--images", default=env("IMAGES", str(ROOT.parent / "shared" / "images" / "coco128")),
        help="photo folder (env IMAGES)")
    add("--out", type=Path, default=Path(env("BENCH_OUT", ROOT / "bench" / "results.json")),
        help="JSON results; Locust's reports and pod logs go to runs/ beside it (env BENCH_OUT)")
    return parser.parse_args(argv)


def raw_ceiling(args):
    """1: the in-process loop, run as a subprocess inside a pod-sized cgroup."""
    cgroup = Cgroup.create(f"podlens-bench-{os.getpid()}", args.cpu, args.memory_mib)
    if cgroup is None:
        warn_unlimited()
    cmd = [sys.executable, "-m", "bench.ceiling", "--seconds", str(args.raw_seconds), "--images", args.images]
    try:
        done = subprocess.run(cgroup.command(cmd) if cgroup else cmd, cwd=ROOT, check=True,
                              stdout=subprocess.PIPE, text=True)
    finally:
        if cgroup:
            cgroup.remove()
    return json.loads(done.stdout)


def load(pods, users, seconds, runs, name, args):
    """Locust against the pods: all users at once, then `seconds` of load."""
    return run_locust(pods.url, users, users, seconds, runs / name,
                      ["--timeout", args.timeout, "--images", args.images])


def bench(args):
    runs = args.out.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    figures = {}

    def step(name):
        print(f"bench: {name}", file=sys.stderr, flush=True)

    step("1 raw ceiling")
    figures["raw_ceiling"] = raw = raw_ceiling(args)

    step("5 cold start")
    with Pods(1, args.port, cpu=args.cpu, memory_mib=args.memory_mib, log_dir=runs / "pod") as pod:
        idle = pod.stats()[0]
        figures["cold_start"] = {"ready_seconds": idle["ready_seconds"], "idle_peak_mib": idle["peak_mib"]}

        step("3 latency")
        single = load(pod, 1, args.latency_seconds, runs, "latency", args)
        figures["latency"] = {"p50_ms": single["p50_ms"], "p95_ms": single["p95_ms"],
                              "avg_ms": single["avg_ms"], "raw_ms_per_image": raw["ms_per_image"]}

        step("2 throughput")
        busy = load(pod, args.users, args.seconds, runs, "throughput", args)
        figures["throughput"] = {"users": args.users, "rps": busy["rps"], "failures": busy["failures"],
                                 "ratio_to_raw": round(busy["rps"] / raw["images_per_s"], 3)}

        step("4 overload")
        over = load(pod, args.overload_users, args.overload_seconds, runs, "overload", args)
        after = pod.stats()[0]
        figures["overload"] = {"users": args.overload_users, "requests": over["requests"],
                               "failures": over["failures"], "oom_kills": after["oom_kills"],
                               "restarts": after["restarts"], "peak_mib": after["peak_mib"],
                               "p50_ms": over["p50_ms"], "p95_ms": over["p95_ms"]}

    step("6 scale-out")
    with Pods(args.scale_pods, args.port, cpu=args.cpu, memory_mib=args.memory_mib,
              log_dir=runs / "pods") as pods:
        wide = load(pods, args.scale_users, args.scale_seconds, runs, "scale_out", args)
        figures["scale_out"] = {"pods": args.scale_pods, "users": args.scale_users, "rps": wide["rps"],
                                "failures": wide["failures"],
                                "requests_per_pod": [s["requests"] for s in pods.stats()],
                                "ratio_to_one_pod": round(wide["rps"] / busy["rps"], 2)}
    return figures


def rows(f):
    """(figure, value, target, met) for the table; met is None where there is no target."""
    raw, tp, lat, over = f["raw_ceiling"], f["throughput"], f["latency"], f["overload"]
    cold, scale = f["cold_start"], f["scale_out"]
    mib = lambda v: "n/a" if v is None else f"{v:.0f} MiB"
    peak_ok = over["peak_mib"] is not None and over["peak_mib"] < 450
    return [
        ("1 raw ceiling", f"{raw['images_per_s']} images/s, {raw['ms_per_image']} ms/image", "", None),
        ("2 throughput", f"{tp['rps']} req/s, {tp['ratio_to_raw']:.2f} x raw", ">= 0.95 x raw",
         tp["ratio_to_raw"] >= 0.95),
        ("3 latency, 1 user", f"p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms",
         f"p50 <= {raw['ms_per_image'] + 15:.0f} ms", lat["p50_ms"] <= raw["ms_per_image"] + 15),
        ("4 overload", f"{over['failures']} failures, {over['oom_kills']} OOM kills, peak "
         f"{mib(over['peak_mib'])}, p50 {over['p50_ms']} ms, p95 {over['p95_ms']} ms",
         "0 failures, 0 OOM, peak < 450 MiB", over["failures"] == 0 and not over["oom_kills"] and peak_ok),
        ("5 cold start", f"{cold['ready_seconds']} s, idle peak {mib(cold['idle_peak_mib'])}", "<= 3 s",
         cold["ready_seconds"] <= 3),
        ("6 scale-out",
         f"{scale['rps']} req/s on {scale['pods']} pods, {scale['ratio_to_one_pod']:.2f} x 1 pod",
         ">= 2.7 x", scale["ratio_to_one_pod"] >= 2.7),
    ]


def table(figures):
    lines = [("figure", "measured", "target", "met")]
    lines += [(name, value, target, "" if met is None else "yes" if met else "NO")
              for name, value, target, met in rows(figures)]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up pods as on Ctrl-C
    figures = bench(args)
    figures["targets_met"] = {name: met for name, _, _, met in rows(figures) if met is not None}
    # Paths relative to the repository, so the results read the same on any machine.
    figures["settings"] = {k: os.path.relpath(v, ROOT) if isinstance(v, Path) or str(v).startswith("/") else str(v)
                           for k, v in vars(args).items()}
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

"""The scaling experiment: how many users do N pods serve before requests fail?

For each pod count: ramp the users up in steps (--step-users per pod every
--step-seconds) until the first failed request; take the last step before
it; hold that many users for --hold seconds; if the hold sees a failure,
step down and hold again. The held count that passes is the pod count's
"max users", reported with the hold's response times and throughput.

A request fails when it is not answered correctly within --timeout seconds
(the locustfile's rules). With no think time each user is a closed loop, so
the response time settles at about users / throughput: a step must last
longer than the response time it reaches, and a failure shows up only
--timeout seconds after the request that failed was sent.

    python -m experiment.run                       # local pods: 1, 2 and 3
    python -m experiment.run --kube --url http://NODE_ADDRESS:30080 --pods 1 2 4 8
"""

import argparse
import csv
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from experiment.load import run_locust
from experiment.pods import Pods

ROOT = Path(__file__).resolve().parent.parent
# The course's figures (max users, average response time in ms), measured
# with a client outside the cluster and on its master node.
REFERENCE = {1: (6, 3134.74), 2: (6, 1858.45), 4: (8, 1308.43), 8: (13, 1127.32)}
REFERENCE_MASTER = {1: (5, 2862.66), 2: (6, 1778.42), 4: (8, 1273.25), 8: (13, 1109.23)}
COLUMNS = ["pods", "max_users", "avg_ms", "p95_ms", "rps", "requests", "failures",
           "requests_per_pod", "restarts", "oom_kills", "peak_mib"]


def parse_args(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The course measured 1, 2, 4 and 8 pods on a cluster. Here the default is 1 2 3: "
               "four pods of 0.5 CPU plus Locust need more than this machine's 2 cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--pods", type=int, nargs="+", default=[int(n) for n in env("EXPERIMENT_PODS", "1 2 3").split()],
        help="pod counts to measure (env EXPERIMENT_PODS)")
    add("--hold", type=float, default=float(env("EXPERIMENT_HOLD", 180)),
        help="seconds to hold the candidate user count, after spawning (env EXPERIMENT_HOLD)")
    add("--timeout", type=float, default=float(env("EXPERIMENT_TIMEOUT", 60)),
        help="seconds after which a request counts as failed (env EXPERIMENT_TIMEOUT)")
    add("--step-users", type=int, default=int(env("EXPERIMENT_STEP_USERS", 40)),
        help="users added per step, per pod (env EXPERIMENT_STEP_USERS)")
    add("--step-seconds", type=float, default=float(env("EXPERIMENT_STEP_SECONDS", 90)),
        help="length of a ramp step; keep it above --timeout (env EXPERIMENT_STEP_SECONDS)")
    add("--max-users", type=int, default=int(env("EXPERIMENT_MAX_USERS", 600)),
        help="where the ramp stops if nothing failed, per pod (env EXPERIMENT_MAX_USERS)")
    add("--spawn-seconds", type=float, default=float(env("EXPERIMENT_SPAWN_SECONDS", 30)),
        help="users are started at max(1, users / this) per second: the course's 1/s "
             "at small counts, at most this long at large ones (env EXPERIMENT_SPAWN_SECONDS)")
    add("--images", default=env("IMAGES"),
        help="photo folder (env IMAGES; unset: the locustfile's default, coco128)")
    add("--out", type=Path, default=Path(env("EXPERIMENT_OUT", ROOT / "experiment" / "results" /
                                             datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))),
        help="output folder, by default named after the UTC time (env EXPERIMENT_OUT)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_false", dest="kube", default=argparse.SUPPRESS,
                      help="local pods: server.py processes in cgroups (the default)")
    mode.add_argument("--kube", action="store_true", default=argparse.SUPPRESS,
                      help="a cluster: kubectl scales deployment/podlens (delete its HPA first, "
                           "or it scales back); needs --url (env EXPERIMENT_KUBE=1)")
    add("--url", default=env("EXPERIMENT_URL"),
        help="the service's URL with --kube, e.g. a NodePort (env EXPERIMENT_URL)")
    add("--port", type=int, default=int(env("EXPERIMENT_PORT", 18080)),
        help="local pods' shared port, apart from a server you run on 8080 (env EXPERIMENT_PORT)")
    add("--cpu", type=float, default=float(env("POD_CPU", 0.5)), help="CPUs per local pod (env POD_CPU)")
    add("--memory-mib", type=int, default=int(env("POD_MEMORY_MIB", 512)),
        help="memory limit per local pod (env POD_MEMORY_MIB)")
    args = parser.parse_args(argv)
    args.kube = getattr(args, "kube", env("EXPERIMENT_KUBE") == "1")
    if args.kube and not args.url:
        parser.error("--kube needs --url")
    return args


def spawn_rate(users, args):
    return max(1.0, users / args.spawn_seconds)


def measure(pods, url, args, count_requests):
    """Ramp, then hold; the figures of the hold that passed, or of the last one tried."""
    step = args.step_users * pods
    max_users = args.max_users * pods
    options = ["--timeout", args.timeout] + (["--images", args.images] if args.images else [])

    def say(text):
        print(f"pods {pods} | {text}", flush=True)

    steps = math.ceil(max_users / step)
    say(f"ramp: +{step} users every {args.step_seconds:g} s up to {max_users}, until a request fails")
    ramp = run_locust(url, step, spawn_rate(step, args), steps * args.step_seconds + 10,
                      args.out / f"pods{pods}-ramp",
                      options + ["--step-users", step, "--step-seconds", args.step_seconds,
                                 "--max-users", max_users],
                      echo=lambda line: say(f"ramp: {line}"))
    first_failure = ramp["first_failure_users"]
    # A request fails a timeout after it was sent, maybe a step later: take
    # the step below the one reached when it failed; the hold checks it.
    users = max(1, (first_failure // step - 1) * step) if first_failure else max_users
    while True:
        before = count_requests()
        rate = spawn_rate(users, args)
        hold = run_locust(url, users, rate, users / rate + args.hold, args.out / f"pods{pods}-hold{users}",
                          options + ["--reset-stats"])
        passed = hold["failures"] == 0
        say(f"hold {users} users {args.hold:g} s: {hold['rps']} req/s, avg {hold['avg_ms']:.0f} ms, "
            f"p95 {hold['p95_ms']} ms, {hold['failures']} failures: {'pass' if passed else 'fail'}")
        if passed or users == 1:
            break
        users = max(1, users - step)
    served = [after - b for after, b in zip(count_requests(), before)]
    return {"pods": pods, "max_users": users if passed else 0, **hold,
            "requests_per_pod": " ".join(map(str, served))}


def run_local(pods, args):
    with Pods(pods, args.port, cpu=args.cpu, memory_mib=args.memory_mib,
              log_dir=args.out / f"pods{pods}-logs") as local:
        url = local.url
        result = measure(pods, url, args, lambda: [s["requests"] for s in local.stats()])
        stats = local.stats()
    peaks = [s["peak_mib"] for s in stats if s["peak_mib"] is not None]
    return {**result, "restarts": sum(s["restarts"] for s in stats),
            "oom_kills": sum(s["oom_kills"] or 0 for s in stats), "peak_mib": max(peaks, default=None)}


def run_kube(pods, args):
    def kubectl(*words):
        return subprocess.run(["kubectl", *words], check=True, capture_output=True, text=True).stdout

    kubectl("scale", "deployment/podlens", f"--replicas={pods}")
    kubectl("rollout", "status", "deployment/podlens", "--timeout=600s")
    # Per-pod request counts are not visible from outside; the cluster has its own metrics.
    result = measure(pods, args.url.rstrip("/"), args, lambda: [])
    pods_of = ["get", "pods", "-l", "app.kubernetes.io/name=podlens", "-o"]
    restarts = kubectl(*pods_of, "jsonpath={..restartCount}").split()
    # Only each container's last termination is kept: a lower bound of its OOM kills.
    reasons = kubectl(*pods_of, "jsonpath={..lastState.terminated.reason}").split()
    return {**result, "restarts": sum(map(int, restarts)), "oom_kills": reasons.count("OOMKilled"),
            "peak_mib": None}


def write_results(results, out):
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)

    def ref(table, pods, i):
        return str(table[pods][i]) if pods in table else "–"

    lines = ["| pods | max users | avg response (ms) | p95 (ms) | req/s | reference max users | "
             "reference avg (ms) | reference, master node: users / avg (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r["pods"]
        lines.append(f"| {p} | {r['max_users']} | {r['avg_ms']:.0f} | {r['p95_ms']} | {r['rps']} | "
                     f"{ref(REFERENCE, p, 0)} | {ref(REFERENCE, p, 1)} | "
                     f"{ref(REFERENCE_MASTER, p, 0)} / {ref(REFERENCE_MASTER, p, 1)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    plot(results, out / "max_users.png", "max_users", 0, "max users without a failure")
    plot(results, out / "response_time.png", "avg_ms", 1, "average response time (ms)")


def plot(results, path, key, ref_index, ylabel):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["pods"] for r in results], [r[key] for r in results], "o-", label="ours (local pods)")
    for table, label in ((REFERENCE, "course, remote client"), (REFERENCE_MASTER, "course, master node")):
        ax.plot(list(table), [v[ref_index] for v in table.values()], "s--", label=label)
    # Ours and the course's differ by orders of magnitude: a log scale shows both.
    ax.set_yscale("log")
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("pods")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({r["pods"] for r in results} | set(REFERENCE)))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up pods as on Ctrl-C
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"results in {args.out}", flush=True)
    results = []
    for pods in args.pods:
        started = time.monotonic()
        results.append(run_kube(pods, args) if args.kube else run_local(pods, args))
        write_results(results, args.out)  # after each pod count, so a stopped run keeps its figures
        print(f"pods {pods} | max users {results[-1]['max_users']} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()

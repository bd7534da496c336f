"""Local "pods": server.py processes sharing one port, each in its own cgroup.

In the course's cluster a pod is one server process limited to 0.5 CPU and
512 MiB, and a Service spreads connections over the pods. Here
`server.py --reuse-port` lets N processes bind one port, so the kernel
spreads connections over them, and a cgroup per process imposes the pod's
CPU quota and memory limit, so throttling and OOM kills happen as they would
in the cluster. A supervisor thread restarts a pod whose process died, as the
kubelet restarts a crashed container.

Used by experiment/run.py and bench/bench.py. Run alone, it starts pods and
prints their figures every few seconds until Ctrl-C:

    python -m experiment.pods --pods 3 --port 8080
"""

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server.py"
CGROUP_FS = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
# Substrings of an access-log line (one per request, on the server's stderr).
READY_LINE = ("GET /readyz ", '" 200 ')
DETECT_LINE = '"POST /api/object_detection'


def _own_cgroup(controller):
    """This process's cgroup path in a v1 controller's hierarchy, or in v2's ('')."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path.lstrip("/")
    return ""


def _write(path, value):
    path.write_text(f"{value}\n")


def _counter(path, name):
    """A 'name value' line's value from a cgroup file such as memory.events."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


class Cgroup:
    """A pod-sized cgroup: v2, or the cpu and memory hierarchies of v1.

    Create one with Cgroup.create(); run a command in it with command().
    """

    def __init__(self, version, dirs):
        self.version = version
        self.dirs = dirs  # v2: [dir]; v1: [cpu dir, memory dir]

    @classmethod
    def create(cls, name, cpu, memory_mib):
        """A new cgroup, or None when this machine lets us create none."""
        quota = int(cpu * CPU_PERIOD_US)
        limit = memory_mib * 1024 * 1024
        if (CGROUP_FS / "cgroup.controllers").exists():
            def limit_v2(d):
                # Controllers must be enabled in the parent before a child has their files.
                try:
                    _write(d.parent / "cgroup.subtree_control", "+cpu +memory")
                except OSError:
                    pass
                d.mkdir()
                _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
                _write(d / "memory.max", limit)
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", 0)
            made = cls._make("", name, limit_v2)
            return made and cls(2, [made])

        def limit_cpu(d):
            d.mkdir()
            _write(d / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(d / "cpu.cfs_quota_us", quota)

        def limit_memory(d):
            d.mkdir()
            _write(d / "memory.limit_in_bytes", limit)
            if (d / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit either
                _write(d / "memory.memsw.limit_in_bytes", limit)

        cpu_dir = cls._make("cpu", name, limit_cpu)
        memory_dir = cpu_dir and cls._make("memory", name, limit_memory)
        if not memory_dir:
            if cpu_dir:
                cpu_dir.rmdir()
            return None
        return cls(1, [cpu_dir, memory_dir])

    @staticmethod
    def _make(controller, name, setup):
        """Make the cgroup beneath our own one, else at the hierarchy's root."""
        hierarchy = CGROUP_FS / controller
        for parent in (hierarchy / _own_cgroup(controller), hierarchy):
            d = parent / name
            try:
                setup(d)
                return d
            except OSError:
                with contextlib.suppress(OSError):
                    d.rmdir()
        return None

    def command(self, cmd):
        """cmd, wrapped so that its process joins this cgroup before it starts."""
        joins = "".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))} && " for d in self.dirs)
        return ["sh", "-c", joins + 'exec "$@"', "sh", *cmd]

    def oom_kills(self):
        memory = self.dirs[-1]
        if self.version == 2:
            return _counter(memory / "memory.events", "oom_kill")
        return _counter(memory / "memory.oom_control", "oom_kill")

    def peak_bytes(self):
        """Peak memory use (memory.peak needs Linux 5.19 on v2), or None."""
        peak = self.dirs[-1] / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(peak.read_text()) if peak.exists() else None

    def remove(self):
        for d in self.dirs:
            # The kernel keeps a cgroup busy for a moment after its last process exited.
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def warn_unlimited():
    print("\n" + "!" * 72 + "\nWARNING: cannot create cgroups here (neither v1 nor v2 is writable):\n"
          "pods run as plain processes WITHOUT CPU or memory limits, so their\n"
          "figures are not those of 0.5 CPU / 512 MiB pods, and OOM kills and\n"
          "peak memory are not measured.\n" + "!" * 72 + "\n", file=sys.stderr, flush=True)


class Pod:
    """One server process, its cgroup and its log file."""

    def __init__(self, index, cgroup, log_path):
        self.index = index
        self.cgroup = cgroup
        self.log_path = log_path
        self.process = None
        self.wanted = False  # the supervisor restarts a wanted pod that died
        self.restarts = 0
        self.started_at = None
        self.ready_seconds = None  # from process start to its first 200 from /readyz
        self.log_offset = 0  # where this process's lines start in the log

    def start(self, cmd):
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.cgroup.command(cmd) if self.cgroup else cmd,
                                            stdout=log, stderr=log, cwd=ROOT,
                                            # Ctrl-C reaches only us; close() drains the pods.
                                            start_new_session=True)
        self.started_at = time.monotonic()
        self.ready_seconds = None
        self.wanted = True

    def log_lines(self, since_start=False):
        with open(self.log_path, errors="replace") as log:
            log.seek(self.log_offset if since_start else 0)
            return log.readlines()

    def answered_ready(self):
        return any(all(s in line for s in READY_LINE) for line in self.log_lines(since_start=True))

    def requests(self):
        """Detection requests served, over all of this pod's processes."""
        return sum(DETECT_LINE in line for line in self.log_lines())

    def stats(self):
        peak = self.cgroup and self.cgroup.peak_bytes()
        return {
            "pod": self.index,
            "pid": self.process.pid,
            "alive": self.process.poll() is None,
            "restarts": self.restarts,
            "oom_kills": self.cgroup.oom_kills() if self.cgroup else None,
            "peak_mib": round(peak / 2**20, 1) if peak else None,
            "requests": self.requests(),
            "ready_seconds": self.ready_seconds,
        }


class Pods:
    """N pods on one port, as a context manager that cleans up on exit.

    with Pods(3, port=8080) as pods:   # returns once every pod is ready
        ...
        print(pods.stats())
    """

    def __init__(self, count, port=8080, host="127.0.0.1", cpu=0.5, memory_mib=512,
                 log_dir=None, ready_timeout=180):
        self.count = count
        self.url = f"http://{host}:{port}"
        self.cpu = cpu
        self.memory_mib = memory_mib
        self.log_dir = Path(log_dir or ROOT / "experiment" / "logs")
        self.cmd = [sys.executable, str(SERVER), "--host", host, "--port", str(port), "--reuse-port"]
        self.ready_timeout = ready_timeout
        self.pods = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # so the supervisor never restarts a pod stop() ends
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    def __enter__(self):
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for i in range(self.count):
                cgroup = Cgroup.create(f"podlens-{os.getpid()}-{i}", self.cpu, self.memory_mib)
                if cgroup is None and i == 0:
                    warn_unlimited()
                log_path = self.log_dir / f"pod-{i}.log"
                log_path.unlink(missing_ok=True)
                self.pods.append(Pod(i, cgroup, log_path))
            for pod in self.pods:
                pod.start(self.cmd)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        self._supervisor.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout=None):
        """Poll /readyz until every pod's own log shows that it answered 200.

        The port is shared, so one answer says nothing about which pod gave
        it; each poll is a new connection, which the kernel hands to a
        random pod, and each pod logs the polls it answered.
        """
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while True:
            # A dead pod is not ready; the supervisor, once running, restarts it.
            waiting = [pod for pod in self.pods
                       if pod.wanted and (pod.ready_seconds is None or pod.process.poll() is not None)]
            for pod in waiting:
                if pod.process.poll() is not None and not self._supervisor.is_alive():
                    tail = "".join(pod.log_lines(since_start=True)[-20:])
                    raise RuntimeError(f"pod {pod.index} exited with {pod.process.returncode}:\n{tail}")
            if not waiting:
                return
            try:
                urllib.request.urlopen(self.url + "/readyz", timeout=2).close()
            except OSError:
                pass  # not listening yet, or 503 while the model loads
            for pod in waiting:
                if pod.process.poll() is None and pod.answered_ready():
                    pod.ready_seconds = round(time.monotonic() - pod.started_at, 2)
            if time.monotonic() > deadline:
                raise TimeoutError(f"pods {[p.index for p in waiting]} not ready after "
                                   f"{timeout or self.ready_timeout} s; see {self.log_dir}")
            time.sleep(0.05)

    def _supervise(self):
        while not self._stopping.wait(0.5):
            with self._lock:
                for pod in self.pods:
                    if pod.wanted and pod.process.poll() is not None:
                        print(f"pod {pod.index} exited with {pod.process.returncode}; restarting it",
                              file=sys.stderr, flush=True)
                        pod.restarts += 1
                        pod.start(self.cmd)

    def kill(self, index, sig=signal.SIGKILL):
        """Signal a pod's process, as a crash would; the supervisor restarts it."""
        self.pods[index].process.send_signal(sig)

    def stop(self, index):
        """Stop a pod for good (SIGTERM, so it drains), as scaling down does."""
        self._stop([self.pods[index]])

    def _stop(self, pods, timeout=30):
        # SIGTERM to all first, so that they drain at the same time.
        with self._lock:
            running = [pod for pod in pods if pod.process and pod.process.poll() is None]
            for pod in pods:
                pod.wanted = False
            for pod in running:
                pod.process.terminate()
        for pod in running:
            try:
                pod.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pod.process.kill()
                pod.process.wait()

    def stats(self):
        return [pod.stats() for pod in self.pods]

    def close(self):
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join()
        self._stop(self.pods)
        for pod in self.pods:
            if pod.cgroup:
                pod.cgroup.remove()


def format_stats(stats):
    """The pods' figures as an aligned text table."""
    columns = ["pod", "pid", "alive", "restarts", "oom_kills", "peak_mib", "requests", "ready_seconds"]
    rows = [columns] + [["n/a" if s[c] is None else str(s[c]) for c in columns] for s in stats]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    env = os.environ.get
    parser.add_argument("--pods", type=int, default=int(env("PODS", 1)), help="pod count (env PODS)")
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"), help="address to bind (env HOST)")
    parser.add_argument("--port", type=int, default=int(env("PORT", 8080)), help="shared port (env PORT)")
    parser.add_argument("--cpu", type=float, default=float(env("POD_CPU", 0.5)),
                        help="CPU quota of each pod, in CPUs (env POD_CPU)")
    parser.add_argument("--memory-mib", type=int, default=int(env("POD_MEMORY_MIB", 512)),
                        help="memory limit of each pod (env POD_MEMORY_MIB)")
    parser.add_argument("--log-dir", default=env("LOG_DIR", str(ROOT / "experiment" / "logs")),
                        help="folder of the pods' log files (env LOG_DIR)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between stats tables")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up as on Ctrl-C

    with Pods(args.pods, args.port, args.host, args.cpu, args.memory_mib, args.log_dir) as pods:
        print(f"{args.pods} pod(s) ready at {pods.url}; Ctrl-C stops them", flush=True)
        try:
            while True:
                print(format_stats(pods.stats()) + "\n", flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
        print(format_stats(pods.stats()))


if __name__ == "__main__":
    main()

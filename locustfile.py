"""Load test of podlens: users post the photos of a folder for detection.

Each user posts one photo after another (round robin from a random start),
with a fresh uuid4 id and no think time unless --wait says so. A request
fails when it is not a 200, not JSON, answers another id, breaks the
response schema, or takes longer than --timeout seconds.

    locust -f locustfile.py --host http://127.0.0.1:8080 --headless -u 10 -r 1 -t 60s
    locust -f locustfile.py --host http://127.0.0.1:8080            # web UI on :8089
    locust -f locustfile.py --host ... --headless --processes 2 -u 100 -r 10 -t 2m

With --step-users N the load grows by N users every --step-seconds, up to
--max-users, and the run stops at the first failure; -u and -r are ignored
then except -r as the spawn rate of each step. Without it, -u, -r and -t
work as usual.
"""

import base64
import logging
import random
import uuid
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, events, task

DEFAULT_IMAGES = "inputfolder" if Path("inputfolder").is_dir() else "../shared/images/coco128"
PATH = "/api/object_detection"

# Base64 bodies of the photos, encoded once per test run in each process.
images = []


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    parser.add_argument("--images", default=DEFAULT_IMAGES, env_var="LOCUST_IMAGES",
                        help="folder of JPEG photos to post (default: %(default)s)")
    parser.add_argument("--wait", type=float, default=0.0, env_var="LOCUST_WAIT",
                        help="think time in seconds between a user's requests, "
                             "drawn from 0..2x this value (default: 0, a closed loop)")
    parser.add_argument("--timeout", type=float, default=60.0, env_var="LOCUST_TIMEOUT",
                        help="seconds after which a request counts as failed (default: 60)")
    parser.add_argument("--step-users", type=int, default=0, env_var="LOCUST_STEP_USERS",
                        help="grow the load by this many users per step, stopping at the "
                             "first failure (default: 0, a constant load of -u users)")
    parser.add_argument("--step-seconds", type=float, default=90.0, env_var="LOCUST_STEP_SECONDS",
                        help="length of each step; make it longer than --timeout so that a "
                             "step's failures show up within it (default: 90)")
    parser.add_argument("--max-users", type=int, default=1000, env_var="LOCUST_MAX_USERS",
                        help="the last step's user count (default: 1000)")


@events.test_start.add_listener
def load_images(environment, **kwargs):
    # test_start fires on each worker after the master's options arrived,
    # so --images given to the master is the folder every worker reads.
    folder = Path(environment.parsed_options.images)
    paths = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.jpeg"))
    if not paths:
        raise SystemExit(f"no .jpg photos in {folder.resolve()}; pass --images FOLDER")
    images[:] = [base64.b64encode(path.read_bytes()).decode("ascii") for path in paths]


def problem(response, request_id, timeout):
    """What is wrong with a detection response, or None when it is right."""
    # First, as the client gives up after the timeout with a socket error.
    if response.request_meta["response_time"] >= timeout * 1000:
        return f"slower than the {timeout:g} s timeout"
    if response.status_code != 200:
        detail = getattr(response, "error", None) or (response.text or "")[:200]
        return f"status {response.status_code}: {detail}"
    try:
        body = response.json()
    except ValueError:
        return "response is not JSON"
    if not isinstance(body, dict) or body.get("id") != request_id:
        return "response has another id"
    objects = body.get("objects")
    if not isinstance(objects, list):
        return "response has no objects list"
    for obj in objects:
        try:
            rectangle = obj["rectangle"]
            valid = (isinstance(obj["label"], str)
                     and type(obj["accuracy"]) in (float, int)
                     and all(type(rectangle[k]) is int for k in ("height", "left", "top", "width")))
        except (KeyError, TypeError):
            valid = False
        if not valid:
            return f"broken object in response: {obj!r:.200}"
    return None


class Photographer(FastHttpUser):
    def __init__(self, environment):
        options = environment.parsed_options
        # The client gives up on a silent socket after the timeout; the
        # response time check in problem() covers the total time as well.
        self.network_timeout = self.connection_timeout = options.timeout
        super().__init__(environment)
        self.next_image = random.randrange(len(images))

    def wait_time(self):
        return random.uniform(0, 2 * self.environment.parsed_options.wait)

    @task
    def detect(self):
        request_id = str(uuid.uuid4())
        image = images[self.next_image]
        self.next_image = (self.next_image + 1) % len(images)
        timeout = self.environment.parsed_options.timeout
        with self.client.post(PATH, json={"id": request_id, "image": image},
                              catch_response=True) as response:
            reason = problem(response, request_id, timeout)
            if reason:
                response.failure(reason)
            else:
                response.success()


class StepLoad(LoadTestShape):
    """Adds --step-users every --step-seconds until the first failure, when asked to."""

    use_common_options = True  # -u, -r and -t keep their meaning without --step-users

    def reset_time(self):
        super().reset_time()
        self.step = 0

    def tick(self):
        options = self.runner.environment.parsed_options
        # Locust leaves --run-time to a shape, even with use_common_options.
        if options.run_time and self.get_run_time() >= options.run_time:
            return None
        if options.step_users <= 0:
            return options.num_users, options.spawn_rate
        stats = self.runner.stats.total
        if stats.num_failures:
            logging.info("step load: first failure at %d users, stopping", self.runner.user_count)
            return None
        step = int(self.get_run_time() // options.step_seconds)
        if step != self.step:
            logging.info("step load: %d users held %g s: %.1f req/s, p95 %s ms, 0 failures",
                         self.runner.user_count, options.step_seconds, stats.current_rps,
                         stats.get_current_response_time_percentile(0.95))
            self.step = step
        last_step = -(-options.max_users // options.step_users) - 1
        if step > last_step:
            return None
        return min(options.step_users * (step + 1), options.max_users), options.spawn_rate

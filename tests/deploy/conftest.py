"""Fixtures of the deployment tests: processes in sessions of their own, always ended; a corpus."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests import _deploy_support

from _deploy_support import N_IMAGES, end_tree  # noqa: E402

from flows.demo import make_corpus  # noqa: E402


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """spawn(cmd, **popen_kwargs) -> Popen in a new session; the whole session is ended in teardown."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        end_tree(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """N_IMAGES generated images plus the two broken files make_corpus always adds."""
    root = tmp_path_factory.mktemp("corpus") / "images"
    files = make_corpus(root, N_IMAGES, seed=11)
    assert len(files) == N_IMAGES + 2
    return root

"""Fixtures only (the helpers they use live in tests/helpers/): each test's own folders, and runs trained once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.env import isolate
from tests.helpers.runs import RunCache


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The fast tests' networks are tiny: a second torch thread buys nothing, and on two cores shared with other work
    its OpenMP barriers stall every small op for a scheduler tick (a tiny finetune then takes seconds, not 0.3 s).
    Subprocesses the tests start get as many threads (tests/helpers/cli.py), so runs compared across them match.
    Session-wide, so that module- and session-scoped fixtures train with it too. Yields torch's default."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(1)
    yield default
    torch.set_num_threads(default)


@pytest.fixture(autouse=True)
def default_threads_for_slow_tests(request, one_torch_thread):
    """The slow tests (full-size networks on real data) run with torch's default threads."""
    if not request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    torch.set_num_threads(one_torch_thread)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """Outputs, cache and an (empty) data folder inside tmp_path (MSIF_OUTPUTS / MSIF_CACHE / MSIF_DATA); the
    returned dict is the whole environment, for a test that starts a subprocess."""
    return isolate(tmp_path, monkeypatch)


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory) -> RunCache:
    return RunCache(tmp_path_factory.mktemp("prebuilt"))


@pytest.fixture
def prebuilt(run_cache, env):
    """prebuilt(stage, overrides, upto=None, into=None, config=None): copy the finished runs that
    `msif <stage> <overrides>` makes (trained once per session) into this test's output root (or `into`), and return
    that root. `config` composes another stage's primary config (e.g. "validate-loo", whose overrides name loo.*)."""

    def copy(
        stage: str, overrides: list[str], upto: str | None = None, into: Path | None = None, config: str | None = None
    ) -> Path:
        return run_cache.copy(stage, overrides, Path(into or env["MSIF_OUTPUTS"]), upto, config)

    return copy


@pytest.fixture
def float64():
    """The default dtype float64 for one test (restored afterwards); a module asks for it with
    pytestmark = pytest.mark.usefixtures("float64")."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

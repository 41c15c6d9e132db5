"""SGLang HiCache backend tests: SGLang's real pools and HiCacheController, real NIXL POSIX agent, CPU only.

They need SGLang, which lives in its own venv (scripts/install-sglang.sh -> .venv-sglang); without it
this directory is skipped. Run: ``.venv-sglang/bin/python -m pytest -q tests/sglang_backend``.
"""

import pytest

pytest.importorskip("sglang")

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))
logging.getLogger("nixl").setLevel(logging.WARNING)

import sglang_harness as harness  # noqa: E402  (installs the CPU stand-ins before any SGLang pool module is imported)


@pytest.fixture(scope="session", autouse=True)
def sglang_world():
    harness.init_sglang()
    yield


@pytest.fixture
def store_root(tmp_path) -> str:
    root = tmp_path / "kv"
    root.mkdir()
    return str(root)


@pytest.fixture
def rigs():
    """Controllers made by a test; their storage threads are stopped afterwards."""
    made = []

    def make(*args, **kwargs):
        rig = harness.make_rig(*args, **kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()

"""vLLM connector tests: real vLLM scheduler and connector factory, real NIXL POSIX agent, CPU only.

They need vLLM, which lives in its own venv (scripts/install-vllm.sh -> .venv-vllm); without it
this directory is skipped. Run: ``.venv-vllm/bin/python -m pytest -q tests/vllm_connector``.
"""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vLLM is imported: no GPU here
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

pytest.importorskip("vllm")

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
logging.getLogger("nixl").setLevel(logging.WARNING)

from harness import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def store_root(tmp_path) -> str:
    root = tmp_path / "kv"
    root.mkdir()
    return str(root)

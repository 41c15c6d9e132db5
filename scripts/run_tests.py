"""Run every test suite of the project, each in the venv it needs, and print one total.

The main suite runs in the project venv; the vLLM connector and SGLang backend suites run in
their own venvs (their pins conflict with the main one), built by scripts/install-vllm.sh and
scripts/install-sglang.sh. A suite whose venv is missing is a failure unless
VUA_NIXL_SKIP_ENGINES=1 says to skip it. The last line is "total: N passed, N failed, N skipped".
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def suites() -> list[tuple[str, Path, list[str]]]:
    main = Path(os.environ.get("VENV", REPO / ".venv"))
    vllm = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
    sglang = Path(os.environ.get("SGLANG_VENV", REPO / ".venv-sglang"))
    return [
        ("main", main, ["--ignore=tests/vllm_connector", "--ignore=tests/sglang_backend"]),
        ("vllm", vllm, ["tests/vllm_connector"]),
        ("sglang", sglang, ["tests/sglang_backend"]),
    ]


def counts(junit: Path) -> tuple[int, int, int]:
    root = ET.parse(junit).getroot()
    suites_ = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites_)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites_)
    skipped = sum(int(s.get("skipped", 0)) for s in suites_)
    return tests - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    only = set(os.environ.get("VUA_NIXL_SUITES", "main,vllm,sglang").split(","))
    skip_engines = os.environ.get("VUA_NIXL_SKIP_ENGINES") == "1"
    total = [0, 0, 0]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, venv, args in suites():
            if name not in only:
                continue
            py = venv / "bin" / "python"
            if not py.exists():
                if skip_engines and name != "main":
                    lines.append(f"{name}: skipped (no {venv})")
                    continue
                lines.append(f"{name}: FAILED, venv {venv} missing (make install-engines)")
                total[1] += 1
                continue
            junit = Path(tmp) / f"{name}.xml"
            t0 = time.monotonic()
            rc = subprocess.call([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                                  *args, *argv], cwd=REPO)
            secs = time.monotonic() - t0
            if junit.exists():
                p, f, s = counts(junit)
            else:
                p, f, s = 0, 1, 0
            if rc not in (0, 5) and f == 0:
                f = 1  # pytest failed without a failing test (collection or usage error)
            for i, v in enumerate((p, f, s)):
                total[i] += v
            lines.append(f"{name}: {p} passed, {f} failed, {s} skipped in {secs:.0f} s ({venv.name})")
    print()
    for line in lines:
        print(line)
    print(f"total: {total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return 1 if total[1] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

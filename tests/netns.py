"""Run a pytest module inside a private network namespace and report per-test results.

Dynamo's ZMQ event plane binds 0.0.0.0, so multi-process Dynamo tests must not run in the
host's network namespace. A test module using :class:`NetnsRunner` is executed twice:

* in the host namespace (the normal pytest run), a module-scoped fixture re-runs the *same file*
  once under ``unshare -n`` (loopback up, ``VUA_NETNS=1``) with ``--junitxml``, then each test
  reports the outcome its twin had inside the namespace (pass, fail with the child's message,
  or skip with the child's reason);
* inside the namespace (``VUA_NETNS=1``), the tests run for real and share one graph.

One child run per module keeps the expensive part (starting a Dynamo graph) to once per file.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from dynamo_components.graph import in_private_netns, netns_available, netns_command


def dynamo_importable() -> tuple[bool, str]:
    """Whether the Dynamo runtime and frontend can be imported, and why not."""
    for mod in ("dynamo.llm", "dynamo.runtime", "dynamo.frontend"):
        try:
            if importlib.util.find_spec(mod) is None:
                return False, f"{mod} is not installed"
        except (ImportError, ValueError) as exc:
            return False, f"{mod} cannot be imported: {exc}"
    return True, ""


def inside() -> bool:
    """True when running as the namespaced child (the real test run)."""
    return os.environ.get("VUA_NETNS") == "1" and in_private_netns()


@dataclass
class Outcome:
    status: str  # passed | failed | skipped | missing
    message: str = ""


class NetnsRunner:
    """Runs one test file in a private network namespace and keeps the per-test outcomes."""

    def __init__(self, test_file: str, timeout: float = 300.0, extra_args: list[str] | None = None) -> None:
        self.test_file = str(Path(test_file).resolve())
        self.timeout = timeout
        self.extra_args = extra_args or []
        self.outcomes: dict[str, Outcome] = {}
        self.skip_reason: str | None = None
        self.error: str | None = None
        self._log = ""

    def run(self) -> "NetnsRunner":
        ok, why = dynamo_importable()
        if not ok:
            self.skip_reason = why
            return self
        ok, why = netns_available()
        if not ok:
            self.skip_reason = why
            return self
        with tempfile.TemporaryDirectory(prefix="vua-netns-junit-") as td:
            xml = os.path.join(td, "junit.xml")
            argv = [
                sys.executable, "-m", "pytest", self.test_file, "-q", "-p", "no:cacheprovider",
                f"--junitxml={xml}", "-o", "junit_family=xunit2", *self.extra_args,
            ]
            env = dict(os.environ, VUA_NETNS="1")
            try:
                proc = subprocess.run(
                    netns_command(argv), env=env, capture_output=True, text=True, timeout=self.timeout,
                    start_new_session=True,
                )
                self._log = proc.stdout[-6000:] + proc.stderr[-3000:]
            except subprocess.TimeoutExpired as exc:
                self.error = f"namespaced test run timed out after {self.timeout:.0f} s"
                self._log = str(exc.stdout or "")[-6000:]
                return self
            if not os.path.exists(xml):
                self.error = f"namespaced pytest produced no report (rc {proc.returncode}):\n{self._log}"
                return self
            self._parse(xml)
        return self

    def _parse(self, xml: str) -> None:
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name", "")
            status, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    status = "failed"
                    message = (child.get("message") or "") + "\n" + (child.text or "")
                elif child.tag == "skipped":
                    status = "skipped"
                    message = child.get("message") or ""
            prev = self.outcomes.get(name)
            if prev is None or prev.status == "passed":  # an error in teardown overrides a pass
                self.outcomes[name] = Outcome(status, message.strip())

    def check(self, test_name: str) -> None:
        """Replay the namespaced outcome of ``test_name`` in the host-side test."""
        import pytest

        if self.skip_reason:
            pytest.skip(self.skip_reason)
        if self.error:
            pytest.fail(self.error)
        out = self.outcomes.get(test_name)
        if out is None:
            pytest.fail(f"{test_name} did not run in the network namespace:\n{self._log[-3000:]}")
        if out.status == "skipped":
            pytest.skip(out.message)
        if out.status == "failed":
            pytest.fail(f"[in network namespace] {out.message[-6000:]}", pytrace=False)

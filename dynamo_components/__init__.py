"""NVIDIA Dynamo integration for vua-nixl.

Workers that serve the vua-nixl engine as Dynamo components (aggregated, prefill, decode),
a KV event publisher that tells Dynamo's KV router which prefixes the *shared* store holds
(tier ``external``) and what each worker holds in its own memory (tier ``device``), a local
graph launcher (``vua-nixl up`` / ``python -m dynamo_components.graph``) and Kubernetes
``DynamoGraphDeployment`` manifests under ``deploy/``.

Importing this package does not import Dynamo: the heavy, optional dependencies are imported
lazily by the modules that need them, so ``vua-nixl --help`` works without Dynamo installed.
"""

from __future__ import annotations

#: Dynamo release lines this package was tested against (see docs/DYNAMO.md).
TESTED_DYNAMO_VERSIONS = ("1.6.1",)

__all__ = ["TESTED_DYNAMO_VERSIONS"]

"""The authenticating registry proxy (DESIGN section 3, docs/proxy.md).

Modules: ``_routes`` (route table and write rules), ``_credentials`` (config.json, helpers),
``_auth`` (challenges, token cache), ``_transport`` (shared client session, TLS per registry),
``_upstream`` (auth + retries), ``_uploads`` (upload id table), ``_access`` (who may use which
route from which listener: the host token, static routes and build children), ``_forward`` (the
streaming handler), ``_server`` (listeners and the RegistryPort API), ``_metrics``. Image
references are agent/reference.py, shared with agent/build.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry

from agent.config import Config
from agent.contracts import SandboxPort
from agent.proxy._server import MANIFEST_ACCEPT, Proxy


@asynccontextmanager
async def open_proxy(
    config: Config, registry: CollectorRegistry, sandbox: SandboxPort
) -> AsyncIterator[Proxy]:
    """Start the proxy's listeners (in the sandbox and on the host) for the daemon's lifetime."""
    proxy = Proxy(config, registry, sandbox)
    try:
        await proxy.start()
        yield proxy
    finally:
        await proxy.close()


__all__ = ["MANIFEST_ACCEPT", "Proxy", "open_proxy"]

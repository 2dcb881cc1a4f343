"""The control plane: the Unix-socket server, its op registry and the built-in ops."""

from agent.control.ops import Access, Args, Peer, Registry, RequestContext

__all__ = ["Access", "Args", "Peer", "Registry", "RequestContext"]

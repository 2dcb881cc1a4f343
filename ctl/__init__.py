"""agentctl: the small client of the build-agent daemon.

Imports only the standard library and msgpack, so that it starts quickly inside a workspace task.
"""

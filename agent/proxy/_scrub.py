"""Replacing every secret the proxy knows with ``***`` in a line of text (``Proxy.scrub``).

It runs on every line of every build log, so it must not cost in proportion to the number of
secrets ever seen. Route capabilities, the bulk of them (one per build phase, the last
:data:`KEEP_CAPS` remembered), have a fixed shape: 32 hex digits, or the Basic token of
``build-agent:<cap>``. They are found by pattern and looked up in a set. The few registry
credentials and tokens are replaced one by one, longest first, from a list that is only rebuilt
when they change.
"""

from __future__ import annotations

import base64
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable

KEEP_CAPS = 1024
_CAP_LEN = 32
_HEX_RUN = re.compile(r"[0-9a-f]{32,}")


class Scrubber:
    """``secrets()`` lists the other secrets (credentials, tokens); ``version()`` changes
    whenever that list may have changed."""

    def __init__(
        self, login_user: str, secrets: Callable[[], Iterable[str]], version: Callable[[], object]
    ) -> None:
        self._caps: OrderedDict[str, None] = OrderedDict()
        prefix = base64.b64encode(f"{login_user}:".encode()).decode()
        if len(login_user) % 3 != 2:  # "<user>:" must fill whole base64 groups
            raise ValueError("the login user must be 3k+2 characters long")
        # 32 bytes after the prefix: 43 base64 characters and one '='.
        self._basic = re.compile(re.escape(prefix) + r"[A-Za-z0-9+/]{43}=")
        self._secrets = secrets
        self._version = version
        self._seen_version: object = None
        self._longest_first: list[str] = []

    def add_cap(self, cap: str) -> None:
        self._caps[cap] = None
        while len(self._caps) > KEEP_CAPS:
            self._caps.popitem(last=False)

    def __call__(self, text: str) -> str:
        version = self._version()
        if version != self._seen_version:
            values = {s for s in self._secrets() if len(s) >= 4}
            self._longest_first = sorted(values, key=len, reverse=True)
            self._seen_version = version
        for s in self._longest_first:
            if s in text:
                text = text.replace(s, "***")
        if self._caps:
            text = _HEX_RUN.sub(self._hex_run, text)
            text = self._basic.sub(self._basic_token, text)
        return text

    def _hex_run(self, m: re.Match[str]) -> str:
        run = m.group(0)
        if len(run) == _CAP_LEN:
            return "***" if run in self._caps else run
        out: list[str] = []  # a longer run (a digest): any 32-digit window may be a capability
        i = last = 0
        while i <= len(run) - _CAP_LEN:
            if run[i : i + _CAP_LEN] in self._caps:
                out += [run[last:i], "***"]
                i = last = i + _CAP_LEN
            else:
                i += 1
        out.append(run[last:])
        return "".join(out)

    def _basic_token(self, m: re.Match[str]) -> str:
        cap = base64.b64decode(m.group(0)).decode("ascii", "replace").partition(":")[2]
        return "***" if cap in self._caps else m.group(0)


__all__ = ["KEEP_CAPS", "Scrubber"]

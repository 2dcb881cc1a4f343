"""``egress = "nat"``: a veth pair into the namespace, a default route, and masquerading.

Addresses come from ``sandbox.nat_subnet``: the first host address is the host's end, the second
the namespace's (``eth0`` inside). The nftables rules live in one table of their own,
``inet ba_<netns>``, so removing them is one ``nft delete table``:

- ``input``: nothing from the sandbox reaches the host itself (any of its addresses, any port);
- ``forward``: nothing from the sandbox to link-local (169.254.0.0/16: cloud metadata), to an
  address of the host's own (``fib daddr type local``), or over IPv6;
- ``postrouting``: what the sandbox sends out is masqueraded behind the outgoing interface.

Packets are rejected, not dropped, so a RUN step fails at once instead of timing out. Forwarding
needs ``net.ipv4.ip_forward = 1``; when it was off we turn it on, and the last sandbox removed
turns it off again.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import StartupError
from agent.sandbox import _netns

log = logging.getLogger("agent.sandbox")

_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# Present while ip_forward is on because a sandbox turned it on (shared by every daemon).
_FORWARD_MARK = Path("/run/build-agent-ip_forward")
INNER_IF = "eth0"


@dataclass(frozen=True)
class Egress:
    """The names and addresses of one namespace's egress (all derived from the config)."""

    netns: str
    host_if: str  # the host's end of the veth pair
    host_ip: str
    inner_ip: str
    prefixlen: int

    @property
    def table(self) -> str:
        return table_name(self.netns)


def table_name(netns: str) -> str:
    return f"ba_{netns}"


def host_if_name(netns: str) -> str:
    # Interface names are at most 15 bytes; a namespace name may be 63.
    return "ba-" + hashlib.sha256(netns.encode()).hexdigest()[:10]


def plan(netns: str, subnet: str) -> Egress:
    net = ipaddress.ip_network(subnet)
    hosts = list(net.hosts())
    return Egress(netns, host_if_name(netns), str(hosts[0]), str(hosts[1]), net.prefixlen)


def ruleset(e: Egress) -> str:
    reject = "reject with icmpx type admin-prohibited"
    i = f'iifname "{e.host_if}"'
    return f"""table inet {e.table} {{
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    {i} {reject}
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    {i} ip daddr 169.254.0.0/16 {reject}
    {i} fib daddr type local {reject}
    {i} meta nfproto ipv6 {reject}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {i} oifname != "{e.host_if}" masquerade
  }}
}}
"""


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise StartupError(
            'sandbox.egress = "nat" needs the nft command: install nftables, or set '
            'sandbox.egress = "none"'
        )
    return subprocess.run(
        [nft, *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def table_exists(netns: str) -> bool:
    if shutil.which("nft") is None:
        return False
    return _nft("list", "table", "inet", table_name(netns)).returncode == 0


def link_exists(netns: str) -> bool:
    def lookup() -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=host_if_name(netns)))

    return _netns.run_inside(None, lookup)


def remove(netns: str) -> None:
    """Remove the table and the host's veth end of ``netns`` if they exist (idempotent)."""
    if table_exists(netns):
        r = _nft("delete", "table", "inet", table_name(netns))
        if r.returncode != 0:
            log.warning("could not delete nft table %s: %s", table_name(netns), r.stderr.strip())
    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=host_if_name(netns)):
            with contextlib.suppress(NetlinkError):  # gone with its namespace meanwhile
                ipr.link("del", index=idx)


def _overlap(e: Egress, ipr: Any) -> str | None:
    """The host interface already holding an address in ``e``'s subnet (another daemon's
    sandbox, or a real network), if any."""
    net = ipaddress.ip_network(f"{e.host_ip}/{e.prefixlen}", strict=False)
    for msg in ipr.get_addr(family=socket.AF_INET):
        addr = msg.get_attr("IFA_ADDRESS")
        if addr and ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False).overlaps(net):
            return f"{msg.get_attr('IFA_LABEL') or msg['index']} ({addr}/{msg['prefixlen']})"
    return None


def setup(e: Egress) -> None:
    """Create the veth pair, addresses, route and rules, and turn ``ip_forward`` on."""
    remove(e.netns)
    with IPRoute() as ipr:
        taken = _overlap(e, ipr)
    if taken is not None:
        raise StartupError(
            f"sandbox.nat_subnet {e.host_ip}/{e.prefixlen} overlaps the host's {taken}; choose "
            "a free subnet (each daemon on a node needs its own)"
        )
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=e.host_if,
                kind="veth",
                peer={"ifname": INNER_IF, "net_ns_fd": _netns.path(e.netns)},
            )
            (idx,) = ipr.link_lookup(ifname=e.host_if)
            ipr.addr("add", index=idx, address=e.host_ip, prefixlen=e.prefixlen)
            ipr.link("set", index=idx, state="up")

        def inner() -> None:
            with IPRoute() as ipr:
                (idx,) = ipr.link_lookup(ifname=INNER_IF)
                ipr.addr("add", index=idx, address=e.inner_ip, prefixlen=e.prefixlen)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=e.host_ip)

        _netns.run_inside(e.netns, inner)
    except NetlinkError as exc:
        remove(e.netns)
        raise StartupError(
            f"sandbox egress: cannot set up the veth pair {e.host_if} for {e.netns} "
            f"({exc.args[-1] if exc.args else exc}); check that sandbox.nat_subnet does not "
            f'overlap a network already in use, or set sandbox.egress = "none"'
        ) from exc
    r = _nft("-f", "-", stdin=ruleset(e))
    if r.returncode != 0:
        remove(e.netns)
        raise StartupError(
            f"sandbox egress: nft refused the rules: {r.stderr.strip()}; the kernel needs "
            'nf_tables with nat and fib support, or set sandbox.egress = "none"'
        )
    if _FORWARD.read_text().strip() != "1":
        _FORWARD.write_text("1\n")
        _FORWARD_MARK.touch()
        log.info("turned on net.ipv4.ip_forward for sandbox egress (off again at shutdown)")


def teardown(e: Egress) -> None:
    """Remove ``e``'s veth and rules; the last sandbox to go turns ``ip_forward`` back off when a
    sandbox turned it on (the mark survives a crashed daemon, not a reboot, like the setting)."""
    remove(e.netns)
    if _FORWARD_MARK.exists() and not _other_tables():
        with contextlib.suppress(OSError):
            _FORWARD.write_text("0\n")
        _FORWARD_MARK.unlink(missing_ok=True)
        log.info("turned net.ipv4.ip_forward off again")


def _other_tables() -> bool:
    """Whether another sandbox (another daemon beside this one) still forwards through us."""
    r = _nft("list", "tables", "inet")
    return any(line.split()[-1].startswith("ba_") for line in r.stdout.splitlines() if line)

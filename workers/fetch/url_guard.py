"""SSRF guard: refuse to fetch from addresses that are not on the public internet.

A catalogue URL is data from outside; without a guard, a CMS user could make the fleet
fetch ``http://169.254.169.254/latest/meta-data/`` (cloud credentials) or poke services on
the worker's own network. Every address a fetch would connect to is checked: literal IPs
in the URL (and in each redirect) before the request, host names after DNS resolution at
connect time (a custom aiohttp resolver), so a name that resolves to a private address,
or re-resolves to one later (DNS rebinding), is refused too.

Refused unless the configured allowlist covers them: loopback, private (RFC 1918, ULA),
link-local (which holds the 169.254.169.254 metadata endpoint), carrier-grade NAT,
multicast, reserved and unspecified addresses -- everything Python does not call global --
and the known metadata addresses that are not link-local.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from common.errors import PermanentError, Reason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Metadata services reachable at global-looking addresses (Alibaba Cloud; AWS over IPv6).
_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")}
)


class BlockedAddressError(PermanentError):
    """The URL leads to an address the fleet must not fetch from."""

    reason = Reason.UNSUPPORTED_URL


class AddressPolicy:
    """Which addresses may be fetched from: public ones, plus the allowlisted networks."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allow: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(entry.strip(), strict=False) for entry in allow if entry.strip()
        )

    def __repr__(self) -> str:
        return f"AddressPolicy(allow={[str(n) for n in self.allow]})"

    def why_blocked(self, address: str | IPAddress) -> str | None:
        """None if fetching from ``address`` is allowed, else a short reason."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id:
                ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
            # ::ffff:127.0.0.1 reaches 127.0.0.1; judge the IPv4 address it carries.
            mapped = ip.ipv4_mapped or ip.sixtofour
            if mapped is not None:
                ip = mapped
        if any(ip.version == net.version and ip in net for net in self.allow):
            return None
        if ip in _METADATA_ADDRESSES:
            return "a cloud metadata address"
        for label, flag in (
            ("unspecified", ip.is_unspecified),
            ("loopback", ip.is_loopback),
            ("link-local", ip.is_link_local),
            ("private", ip.is_private),
            ("multicast", ip.is_multicast),
            ("reserved", ip.is_reserved),
        ):
            if flag:
                return f"a {label} address"
        if not ip.is_global:
            return "a non-public address"
        return None

    def check(self, address: str | IPAddress, where: str) -> None:
        why = self.why_blocked(address)
        if why is not None:
            raise BlockedAddressError(
                f"refused: {where} leads to {address}, {why} "
                "(add it to worker.fetch_allow_networks to permit it)"
            )

    def check_literal_host(self, host: str | None, where: str) -> None:
        """Check a URL's host when it is an IP literal (aiohttp skips the resolver then)."""
        if not host:
            return
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: checked after resolution by GuardedResolver
        self.check(ip, where)


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops blocked addresses and refuses a host with none left."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self.policy.why_blocked(r["host"]) is None]
        if not allowed:
            first: Any = results[0]["host"] if results else "nothing"
            # Raised as a PermanentError (not an OSError) so aiohttp passes it through
            # instead of wrapping it as a DNS failure, which would be retried.
            self.policy.check(first, f"host {host!r}")
            raise BlockedAddressError(f"refused: host {host!r} resolved to no usable address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()

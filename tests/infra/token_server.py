"""A small Docker token server for the token-auth test registry.

It follows distribution's ``docs/spec/auth/token.md`` and ``jwt.md``: ``GET /token?service=&
scope=repository:<name>:<actions>&account=`` with optional Basic credentials (no credentials: an
anonymous token granting ``pull`` only); the answer is ``{"token", "access_token", "expires_in",
"issued_at"}`` and the token is an RS256 JWT whose header carries ``x5c`` (the signing
certificate, which the registry trusts through ``rootcertbundle``) and whose claims hold ``iss``,
``sub``, ``aud``, ``exp``, ``nbf``, ``iat``, ``jti`` and ``access``. ``POST /token`` implements
the OAuth2 ``refresh_token`` grant (``docs/spec/auth/oauth.md``) for identity tokens.

It runs on its own thread and event loop so a session-scoped registry can use it from tests
with function-scoped loops, and the benchmark from a plain script.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.infra.registry import Registry, free_port, start_registry


def key_and_cert(
    common_name: str = "build-agent test token signer", *, ip: str | None = None
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """An RSA key and a self-signed certificate valid for a day (``ip``: its subjectAltName,
    for a TLS server)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
    return key, builder.sign(key, hashes.SHA256())


@dataclass
class Fetch:
    account: str
    scopes: list[str]
    grant: str  # basic | anonymous | refresh_token


@dataclass
class TokenServer:
    root: Path
    users: dict[str, str] = field(default_factory=dict)
    identity_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> account
    service: str = "test-registry"
    issuer: str = "test-issuer"
    expires_in: int = 300
    port: int = field(default_factory=free_port)
    fetches: list[Fetch] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.bundle = self.root / "rootcerts.pem"
        self.rotate_key()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def auth_config(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.bundle),
            }
        }

    def rotate_key(self) -> None:
        """A new signing key; the registry trusts it only after a restart (the bundle is read at
        start), and then no longer trusts tokens signed by the old one."""
        self._key, cert = key_and_cert()
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # --- HTTP ---------------------------------------------------------------------------------

    def _grant(self, account: str, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            kind, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if account else [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": self._x5c})
        self.issued.append(token)
        return token

    def _reply(self, token: str) -> web.Response:
        issued = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": issued,
            }
        )

    async def _get(self, request: web.Request) -> web.Response:
        if request.query.get("service") != self.service:
            return web.json_response({"error": "unknown service"}, status=400)
        scopes = request.query.getall("scope", [])
        account = ""
        grant = "anonymous"
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return web.json_response({"error": "bad authorization"}, status=400)
            if scheme.lower() != "basic" or self.users.get(user) != password:
                return web.json_response({"error": "invalid credentials"}, status=401)
            account, grant = user, "basic"
        self.fetches.append(Fetch(account, scopes, grant))
        return self._reply(self._grant(account, scopes))

    async def _post(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "refresh_token":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        account = self.identity_tokens.get(str(form.get("refresh_token", "")))
        if account is None:
            return web.json_response({"error": "invalid_grant"}, status=401)
        scopes = str(form.get("scope", "")).split()
        self.fetches.append(Fetch(account, scopes, "refresh_token"))
        return self._reply(self._grant(account, scopes))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        failed: list[BaseException] = []

        async def serve() -> None:
            app = web.Application()
            app.router.add_get("/token", self._get)
            app.router.add_post("/token", self._post)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(serve())
            except BaseException as exc:
                failed.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="token-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("token server did not start in 10s")
        if failed:
            raise RuntimeError(f"token server failed to start: {failed[0]!r}")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None


@dataclass
class TokenRegistry:
    """A docker-registry with ``auth.token`` and the token server it trusts."""

    registry: Registry
    tokens: TokenServer

    @property
    def host(self) -> str:
        return self.registry.host

    def rotate_key(self) -> None:
        """New signing key, registry restarted on the same port trusting only the new one."""
        self.registry.stop()
        self.tokens.rotate_key()
        self.registry.start()

    def stop(self) -> None:
        self.registry.stop()
        self.tokens.stop()


def start_token_registry(root: Path, users: dict[str, str], **kw: Any) -> TokenRegistry:
    tokens = TokenServer(root / "token", users=users, **kw)
    tokens.start()
    try:
        reg = start_registry(root / "registry", kind="token", extra_auth=tokens.auth_config())
    except BaseException:
        tokens.stop()
        raise
    return TokenRegistry(reg, tokens)

"""The proxy's pure parts: references, route resolution and write rules, challenges, token
lifetimes, Location mapping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.config import ProxyConfig, RegistryConfig, RouteConfig
from agent.contracts import RouteTarget
from agent.errors import BadRequest
from agent.proxy._access import SANDBOX, StaticRules
from agent.proxy._auth import _lifetime, parse_challenges, pick_challenge
from agent.proxy._forward import Forwarder
from agent.proxy._routes import Router, denial, split_oci_path
from agent.proxy._uploads import Uploads
from agent.reference import Reference, parse

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "registry", "repo", "manifest", "canonical"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", "docker.io/library/busybox:latest"),
        ("index.docker.io/team/x:1", "docker.io", "team/x", "1", "docker.io/team/x:1"),
        ("localhost:5000/a/b", "localhost:5000", "a/b", "latest", "localhost:5000/a/b:latest"),
        ("localhost/a", "localhost", "a", "latest", "localhost/a:latest"),
        (
            "reg.example.com:443/a/b:v1.2",
            "reg.example.com",
            "a/b",
            "v1.2",
            "reg.example.com/a/b:v1.2",
        ),
        (f"r.io/a@{D}", "r.io", "a", D, f"r.io/a@{D}"),
        (f"r.io:5000/a/b:t@{D}", "r.io:5000", "a/b", D, f"r.io:5000/a/b:t@{D}"),
    ],
)
def test_parse(ref: str, registry: str, repo: str, manifest: str, canonical: str) -> None:
    # Docker's reading (what a registry is asked) and the caller's spelling, in one type.
    r = parse(f" {ref} ")
    assert (r.registry, r.repository, r.ref, r.canonical) == (registry, repo, manifest, canonical)
    assert str(r) == ref


def test_reference_keeps_the_spelling_routes_and_records_use() -> None:
    r = parse("Localhost:5000/team/app")
    assert (r.repo, r.tag, r.digest, r.registry) == (
        "Localhost:5000/team/app",
        None,
        None,
        "localhost:5000",
    )
    assert Reference(r.repo, "latest") == parse("Localhost:5000/team/app:latest")
    with pytest.raises(BadRequest, match=r"target_ref 'a b' is not an image reference \("):
        parse("a b", what="target_ref")


@pytest.mark.parametrize(
    "ref", ["", "Upper/case", "r.io/a:bad tag", "r.io/a@sha256:short", "r.io/a/../b", "r.io//a"]
)
def test_parse_rejects(ref: str) -> None:
    with pytest.raises(BadRequest):
        parse(ref)


def test_split_oci_path() -> None:
    assert split_oci_path("a/b/manifests/latest") == ("a/b", "manifests", "latest")
    assert split_oci_path("blobs/manifests/x") == ("blobs", "manifests", "x")
    assert split_oci_path(f"a/blobs/{D}") == ("a", "blobs", D)
    assert split_oci_path("a/blobs/uploads/") == ("a", "blobs/uploads", "")
    assert split_oci_path("a/blobs/uploads/abc-1") == ("a", "blobs/uploads", "abc-1")
    assert split_oci_path("a/tags/list") == ("a", "tags", "list")
    for bad in ("a/../b/manifests/x", "a/manifests/..", "a/blobs/notadigest", "a/tags/x", "x"):
        assert split_oci_path(bad) is None


def _router() -> Router:
    return Router(
        ProxyConfig(
            routes=[
                RouteConfig("ws", "reg.example.com/team/images", "push"),
                RouteConfig("ro", "reg.example.com/ro", "pull"),
            ],
            registries=[
                RegistryConfig(host="localhost:5000"),
                RegistryConfig(host="quay.io", name="quay"),
            ],
        )
    )


def test_routes_and_write_rules() -> None:
    r = _router()
    res = r.resolve("ws/sub/manifests/v1", None)
    assert res is not None and res.target.repository == "team/images/sub"
    assert denial(res, "PUT") is None
    res = r.resolve("ws/manifests/v1", None)
    assert res is not None and res.target.repository == "team/images"
    res = r.resolve("ro/x/manifests/v1", None)
    assert res is not None and denial(res, "GET") is None and denial(res, "PUT") is not None
    assert r.resolve("nope/manifests/v1", None) is None
    mirrors = {m.host: m.prefix for m in r.mirrors()}
    assert mirrors == {
        "localhost:5000": "mirror/localhost-5000",
        "quay.io": "mirror/quay",
        "docker.io": "mirror/docker.io",
    }
    res = r.resolve("mirror/docker.io/library/busybox/manifests/1", None)
    assert res is not None and res.target.registry == "docker.io"
    assert denial(res, "PUT") is not None
    res = r.resolve("mirror/docker.io/busybox/manifests/1", None)
    assert res is not None and res.target.repository == "library/busybox"
    res = r.resolve("busybox/manifests/1", "docker.io")
    assert res is not None and res.target.repository == "library/busybox"
    assert r.resolve("busybox/manifests/1", "evil.example") is None
    # BuildKit with a mirror that has a path sends the prefix and ns together.
    res = r.resolve("mirror/quay/org/app/manifests/1", "quay.io")
    assert res is not None and (res.target.registry, res.target.repository) == (
        "quay.io",
        "org/app",
    )
    assert r.resolve("mirror/unknown/org/app/manifests/1", None) is None

    route = r.add_build(
        "localhost:8080",
        RouteTarget("reg.example.com/base"),
        RouteTarget("reg.example.com/team/ws", tag="t1", push=True),
    )
    # Stable names; the capability is the Basic password and appears in no path.
    assert route.base == "localhost:8080/b/reg.example.com/base"
    assert route.target == "localhost:8080/b/reg.example.com/team/ws"
    assert route.login is not None and route.login.address == "localhost:8080"
    cap = route.login.password
    assert len(cap) == 32 and cap not in (route.base + route.target)
    assert r.is_build(cap) and not r.is_build(None) and not r.is_build("0" * 32)
    tgt = r.resolve("b/reg.example.com/team/ws/manifests/t1", None, cap)
    assert tgt is not None and denial(tgt, "PUT") is None and denial(tgt, "DELETE") is None
    assert tgt.target.repository == "team/ws" and tgt.target.registry == "reg.example.com"
    other = r.resolve("b/reg.example.com/team/ws/manifests/t2", None, cap)
    assert other is not None and denial(other, "PUT") is not None
    assert denial(other, "DELETE") is not None
    by_digest = r.resolve(f"b/reg.example.com/team/ws/manifests/{D}", None, cap)
    assert by_digest is not None and denial(by_digest, "PUT") is None
    base = r.resolve("b/reg.example.com/base/blobs/uploads/", None, cap)
    assert base is not None and denial(base, "POST") is not None
    # Without the capability, with another one, or for a repository that is not this build's.
    assert r.resolve("b/reg.example.com/team/ws/manifests/t1", None) is None
    assert r.resolve("b/reg.example.com/team/ws/manifests/t1", None, "0" * 32) is None
    assert r.resolve("b/reg.example.com/team/other/manifests/t1", None, cap) is None
    assert r.resolve("b/reg.example.com/team/ws/sub/manifests/t1", None, cap) is None
    # A second build on the same repository has the same names but its own capability.
    second = r.add_build("localhost:8080", None, RouteTarget("reg.example.com/team/ws", "t9", True))
    assert second.target == route.target and second.login is not None
    mine = r.resolve("b/reg.example.com/team/ws/manifests/t9", None, second.login.password)
    assert mine is not None and denial(mine, "PUT") is None
    assert r.resolve("b/reg.example.com/base/manifests/x", None, second.login.password) is None
    r.remove_build(route)
    assert not r.is_build(cap)
    assert r.resolve("b/reg.example.com/team/ws/manifests/t1", None, cap) is None
    assert r.resolve("b/reg.example.com/team/ws/manifests/t9", None, second.login.password)
    # Base and target in one repository: the name keeps the writable side's rules.
    same = r.add_build(
        "localhost:8080",
        RouteTarget("reg.example.com/team/ws"),
        RouteTarget("reg.example.com/team/ws", tag="t2", push=True),
    )
    assert same.base == same.target and same.login is not None
    both = r.resolve("b/reg.example.com/team/ws/manifests/t2", None, same.login.password)
    assert both is not None and denial(both, "PUT") is None
    # A registry with a port: ':' cannot be in a path component.
    ported = r.add_build("p:1", None, RouteTarget("127.0.0.1:5000/x/y", "t", True))
    assert ported.target == "p:1/b/127.0.0.1-5000/x/y"


def test_challenges() -> None:
    h = (
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push"'
    )
    (c,) = parse_challenges(h)
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "reg.example",
        "scope": "repository:a/b:pull,push",
    }
    both = parse_challenges('Basic realm="x", Bearer realm="https://a/t", service=s')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert pick_challenge('Basic realm="x", Bearer realm="https://a/t"').scheme == "bearer"
    assert pick_challenge('Basic realm="Registry Realm"').scheme == "basic"


def test_token_lifetime() -> None:
    assert _lifetime({}, 60) == pytest.approx(54)
    assert _lifetime({"expires_in": 300}, 60) == pytest.approx(290)
    old = (datetime.now(UTC) - timedelta(seconds=100)).isoformat()
    assert _lifetime({"expires_in": 300, "issued_at": old}, 60) == pytest.approx(190, abs=2)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert _lifetime({"expires_in": 300, "issued_at": future}, 60) == pytest.approx(290)
    # A skewed clock: an issued_at far in the past costs at most half the lifetime.
    ancient = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert _lifetime({"expires_in": 300, "issued_at": ancient}, 60) == pytest.approx(140)


def test_location_mapping_relative_absolute_and_outside_v2() -> None:
    router = _router()
    uploads = Uploads()
    rules = StaticRules([])
    fwd = Forwarder(router, uploads, None, None, None, side=SANDBOX, rules=rules)  # type: ignore[arg-type]
    res = router.resolve("ws/sub/blobs/uploads/", None)
    assert res is not None
    sent = "https://reg.example.com/v2/team/images/sub/blobs/uploads/"
    # Google Artifact Registry style: absolute, not under /v2/, state in the query.
    gar = "https://reg.example.com/artifacts-uploads/namespaces/p/uploads/XYZ?upload_id=1&s=2"
    mapped = fwd._map_location(res, gar, sent, 202)
    assert mapped is not None
    path, _, query = mapped.partition("?")
    assert path.startswith("/v2/ws/sub/blobs/uploads/") and query == "upload_id=1&s=2"
    upload_id = path.rsplit("/", 1)[1]
    stored = uploads.lookup(upload_id, "reg.example.com", "team/images/sub")
    assert stored == "https://reg.example.com/artifacts-uploads/namespaces/p/uploads/XYZ"
    assert uploads.lookup(upload_id, "reg.example.com", "team/other") is None
    # distribution style: relative, under /v2/.
    rel = fwd._map_location(res, "/v2/team/images/sub/blobs/uploads/u-1?_state=abc%3D", sent, 202)
    assert rel is not None and rel.endswith("?_state=abc%3D")
    done = fwd._map_location(res, f"/v2/team/images/sub/blobs/{D}", sent, 201)
    assert done == f"/v2/ws/sub/blobs/{D}"
    assert fwd._map_location(res, "https://cdn.example/x", sent, 201) is None


def test_token_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.proxy import _auth
    from agent.proxy._credentials import CredentialStore

    monkeypatch.setattr(_auth, "_MAX_TOKENS", 3)
    auth = _auth.Authenticator(
        CredentialStore("", [], helper_timeout=1),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        token_ttl=60,
        clock=lambda: 100.0,
    )
    tokens = auth._tokens
    tokens[("r", frozenset({"a"}))] = _auth._Token("old", expires=50.0)
    tokens[("r", frozenset({"b"}))] = _auth._Token("b", expires=200.0)
    tokens[("r", frozenset({"c"}))] = _auth._Token("c", expires=200.0)
    auth._prune()
    assert set(tokens) == {("r", frozenset({"b"})), ("r", frozenset({"c"}))}
    tokens[("r", frozenset({"d"}))] = _auth._Token("d", expires=200.0)
    auth._prune()
    assert len(tokens) < 3 and ("r", frozenset({"d"})) in tokens


def test_retry_after_and_capped_backoff() -> None:
    from email.utils import format_datetime

    from agent.proxy._upstream import Upstream, _retry_after

    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < (_retry_after(later) or 0) <= 31
    up = Upstream(None, None, None, retries=5, max_backoff=2.0)  # type: ignore[arg-type]
    assert up._backoff(1, {"Retry-After": "1"}) == 1.0
    assert up._backoff(1, {"Retry-After": "120"}) == 2.0  # honoured, within the cap
    assert all(0.05 <= up._backoff(1, None) <= 0.1 for _ in range(20))
    assert all(up._backoff(10, None) <= 2.0 for _ in range(20))


def test_link_mapping_for_pagination() -> None:
    """docker-registry 2.8 does not paginate tags/list, so the Link rule is checked here."""
    router = _router()
    rules = StaticRules([])
    fwd = Forwarder(router, Uploads(), None, None, None, side=SANDBOX, rules=rules)  # type: ignore[arg-type]
    res = router.resolve("ws/sub/tags/list", None)
    assert res is not None
    sent = "https://reg.example.com/v2/team/images/sub/tags/list?n=2"
    link = "/v2/team/images/sub/tags/list?n=2&last=b"
    assert fwd._map_link(res, link, sent) == "/v2/ws/sub/tags/list?n=2&last=b"
    absolute = "https://reg.example.com/v2/team/images/sub/tags/list?last=b"
    assert fwd._map_link(res, absolute, sent) == "/v2/ws/sub/tags/list?last=b"
    assert fwd._map_link(res, "https://elsewhere/x", sent) == "https://elsewhere/x"


def test_scrubber_finds_capabilities_by_shape_and_other_secrets_by_value() -> None:
    import secrets as random_secrets

    from agent.contracts import ProxyLogin
    from agent.proxy._scrub import KEEP_CAPS, Scrubber

    others = ["hunter2-password", "abc"]  # "abc": too short to scrub, as before
    version = [0]
    scrub = Scrubber("build-agent", lambda: list(others), lambda: version[0])
    caps = [random_secrets.token_hex(16) for _ in range(3)]
    for cap in caps:
        scrub.add_cap(cap)
    basic = ProxyLogin("", "build-agent", caps[1]).basic()
    digest = "9" * 64
    text = (
        f"push localhost:1/b/{caps[0]}/x; Authorization: Basic {basic}; "
        f"run 0{caps[2]}1; {digest}; password hunter2-password; abc"
    )
    out = scrub(text)
    assert not any(cap in out for cap in caps) and basic not in out
    assert "0***1" in out  # a capability inside a longer hex run is found too
    assert digest in out  # hex that is no capability stays
    assert "hunter2-password" not in out and out.endswith("abc")
    # Another user's Basic token, or an unknown 32-hex string, is left alone.
    stranger = random_secrets.token_hex(16)
    other_basic = ProxyLogin("", "build-agent", stranger).basic()
    assert scrub(f"{stranger} {other_basic}") == f"{stranger} {other_basic}"
    # The value list is rebuilt only when its version changes.
    others.append("new-token-value")
    assert "new-token-value" in scrub("new-token-value")
    version[0] += 1
    assert scrub("new-token-value") == "***"
    # Capabilities are remembered up to KEEP_CAPS, oldest dropped first.
    for _ in range(KEEP_CAPS):
        scrub.add_cap(random_secrets.token_hex(16))
    assert scrub(caps[0]) == caps[0]

"""Fuzz every HTTP route of the sync service in-process (TestClient + hypothesis).

For every generated request: no 5xx; a 4xx is JSON ``{"error": ..., "hint": ...}``; nothing succeeds (2xx/304)
without the credentials its route needs; no byte from outside the blob store ever comes back; nothing reaches the
database that PostgreSQL, unlike SQLite, would refuse (a NUL in text, NaN in JSON: a 500 in production).

Requests mix valid values (the fixture's fleet, releases, devices, tokens) with hostile ones: traversal, encoded
separators, NUL bytes, very long and non-ASCII text, JSON of the wrong shape or range, raw bytes, and credentials that
are missing, garbage, expired, of the wrong kind or of another fleet.

Every route of the OpenAPI spec must have a fuzzer here: ``test_fuzzers_cover_every_route`` fails otherwise.

Every defect it found (five 5xx, two values PostgreSQL refuses, inconsistent error bodies, a fleet-name check) was
fixed; ``tests/test_sync_errors.py`` replays each one and fails if it comes back. ``KNOWN_CRASHES`` and
``KNOWN_PG_REFUSALS`` (``tests/sync_fuzz_world.py``) list defects the fuzzer tolerates while they are open: none now.

Cases are derandomized (the same every run); ``EDGEKIT_FUZZ_RANDOM=1`` explores new ones and
``EDGEKIT_FUZZ_EXAMPLES=N`` sets the cases per route (120 by default: 1,920 requests in all). ``pytest -s`` prints the
status codes per route and the known defects hit.

Limits of doing this in-process: Starlette's TestClient percent-decodes the path twice (``%252e`` arrives as ``.``)
and re-encodes non-ASCII header bytes as UTF-8, so those two details differ from a real server behind uvicorn.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from starlette.routing import Match

from edgekit.sync.db import Release
from edgekit.sync.protocol import NAME
from tests.sync_fuzz_world import (  # noqa: F401 - world is a fixture
    ADMIN,
    DOCS_ROUTES,
    FLEET,
    FUZZ_SETTINGS,
    KNOWN_CRASHES,
    KNOWN_HITS,
    KNOWN_PG_REFUSALS,
    NAME_CHARS,
    OTHER,
    PG_REFUSALS,
    RAW_BODY_LIMITS,
    ROUTES,
    SENTINEL,
    SERVER_RECURSION_LIMIT,
    STATUSES,
    World,
    _blob,
    _match,
    _server_path,
    world_fixture,
)

# -- generated values ---------------------------------------------------------------------------------------------
HOSTILE = [
    "", " ", ".", "..", "../", "..\\", "../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f",
    "%252e%252e%252f", "..%c0%af", "/etc/passwd", "..;/", "../secret.txt", "../../secret.txt", "tmp/secret.txt",
    "secret.txt", "\\\\host\\share", "C:\\Windows\\win.ini", "%00", "\x00", "a\x00b", "\n", "x\n", "\r\n", "\t",
    FLEET + "\n", FLEET + "/..", FLEET + "\x00", "?", "#", "&", "=", "%", "%zz", "{}", "[]", "null", "true", "-1",
    "0", "1e999", "NaN", "' OR '1'='1", "\"; DROP TABLE devices; --", "<script>alert(1)</script>", "${jndi:ldap://x}",
    "{{7*7}}", "\u202e", "\ufeff", "é", "日本語", "🙂", "\ud800", "A" * 5000, "9" * 400, "0" * 64 + "\n", "0" * 65,
    "F" * 64, "a" * 64 + "/..",
]
hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.text(min_size=1, max_size=3).map(lambda s: s * 1500),  # very long
    st.tuples(st.sampled_from(["", "a", FLEET]), st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=3))
    .map("".join),  # control characters, NUL included, after a plausible name
)
# what an HTTP/1.1 field value may hold: visible ASCII, space, tab and obs-text (no NUL, CR or LF)
header_text = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60),
    st.sampled_from(["", " ", "\t", "é", "ÿ" * 300, "x" * 8000, "Bearer", "Bearer ", "null", "\"\"", ",,,"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                         st.sampled_from([2**63, -(2**63) - 1, 10**40, "\ud800", "\x00", "A" * 3000]))
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)
CONTENT_TYPES = ["text/plain", "application/octet-stream", "application/vnd.fuzz+json", "multipart/form-data; b=x",
                 "application/x-www-form-urlencoded", "APPLICATION/JSON; charset=latin-1", "application/json;;;",
                 "*/*", ""]
content_type = st.one_of(st.just("application/json"), st.none(), st.sampled_from(CONTENT_TYPES))


def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each as often as its weight."""
    return st.sampled_from([s for n, s in choices for _ in range(n)]).flatmap(lambda s: s)


def _or_hostile(valid: list[str]) -> st.SearchStrategy[str]:
    return _weighted((2, st.sampled_from(valid)), (1, hostile_text))


def _encode_segment(value: str, mode: str) -> str:
    if mode == "plain":  # what a client would send
        return quote(value, safe="", errors="surrogatepass")
    if mode == "dots":  # every '.' encoded too, so '..' reaches the server instead of being normalized away
        return quote(value, safe="", errors="surrogatepass").replace(".", "%2E")
    return quote(value, safe="/.%?#&=", errors="surrogatepass")  # raw: separators and escapes left as they are


def _schema(components: dict, s: dict) -> st.SearchStrategy:
    """Values for a JSON schema: valid ones, ones just past each bound, and extreme ones."""
    if "$ref" in s:
        return _object(components, components[s["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in s:
        return st.one_of([_schema(components, x) for x in s["anyOf"]])
    if "enum" in s:
        return st.one_of(st.sampled_from(s["enum"]), st.sampled_from([str(e).upper() + " " for e in s["enum"]]))
    t = s.get("type")
    if t in ("integer", "number"):
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        edges = [0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
        edges += [b + d for b in (lo, hi) if b is not None for d in (-1, 0, 1)]
        if t == "integer":
            return st.one_of(st.integers(lo, hi), st.sampled_from(edges))
        extreme = [math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0, 0.5]
        finite = st.floats(lo if lo is not None else -1e9, hi if hi is not None else 1e9)
        return st.one_of(finite, st.sampled_from(edges + extreme))
    if t == "string":
        n = s.get("maxLength")
        options = [st.text(max_size=20), hostile_text]
        if "pattern" in s:
            options.append(st.from_regex(s["pattern"], fullmatch=True))
        if n is not None:
            options.append(st.sampled_from(["x" * n, "x" * (n + 1), "é" * n]))
        if "minLength" in s:
            options.append(st.just("x" * max(0, s["minLength"] - 1)))
        return st.one_of(options)
    if t == "boolean":
        return st.booleans()
    if t == "array":
        item = _schema(components, s.get("items", {}))
        over = s.get("maxItems", 50) + 1
        return st.one_of(st.lists(item, max_size=4), item.map(lambda v: [v] * over))
    if t == "null":
        return st.none()
    return json_values


def _object(components: dict, s: dict, overrides: dict | None = None) -> st.SearchStrategy[dict]:
    """Dicts with the schema's field names, each valid, out of range or of the wrong type; sometimes extra keys."""
    overrides = overrides or {}
    fields = {}
    for name, sub in s.get("properties", {}).items():
        options = [(2, _schema(components, sub)), (1, json_values)]
        if name in overrides:
            options.insert(0, (3, overrides[name]))
        fields[name] = _weighted(*options)
    required = {k: v for k, v in fields.items() if k in s.get("required", [])}
    optional = {k: v for k, v in fields.items() if k not in required}
    base = st.fixed_dictionaries(required, optional=optional)
    extra = st.dictionaries(st.text(max_size=10), json_scalars, max_size=2)
    return st.one_of(base, st.tuples(base, extra).map(lambda t: {**t[1], **t[0]}))


def _dump(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


# -- requests -----------------------------------------------------------------------------------------------------
@dataclass
class Req:
    method: str
    url: str  # path and query, encoded
    headers: dict[str, bytes]
    content: bytes | None
    auth: str  # the kind of credentials sent: none, garbage, or a key of World.tokens

    def __repr__(self) -> str:
        body = self.content if self.content is None or len(self.content) <= 300 else (
            self.content[:300] + f"... ({len(self.content)} bytes)".encode())
        url = self.url if len(self.url) <= 600 else self.url[:600] + f"... ({len(self.url)} chars)"
        hdrs = {k: (v if len(v) <= 200 else v[:200] + b"...") for k, v in self.headers.items()}
        return f"Req({self.method} {url!r} headers={hdrs!r} auth={self.auth} content={body!r})"

    def _repr_pretty_(self, p, cycle: bool) -> None:  # noqa: ANN001 - hypothesis' pretty printer
        p.text(repr(self))


# what each kind of route wants (a "ghost" token is valid, but its device row is gone)
RIGHT_CREDENTIALS = {"public": ["none"], "device": ["device", "device", "other", "ghost"],
                     "tuf": ["device", "admin", "other", "ghost"], "admin": ["admin"]}


def _auth(w: World, route_kind: str = "public") -> st.SearchStrategy[tuple[str, bytes | None]]:
    """(kind, Authorization header value or None): half the time the credentials the route wants."""
    kinds = sorted(w.tokens)
    real = st.sampled_from(kinds).flatmap(lambda k: st.sampled_from([
        (k, f"Bearer {w.tokens[k]}"),
        (k, f"Bearer   {w.tokens[k]}  "),
        ("garbage", f"bearer {w.tokens[k]}"),
        ("garbage", w.tokens[k]),
        ("garbage", f"Basic {w.tokens[k]}"),
        ("garbage", f"Bearer {w.tokens[k]}x"),
        ("garbage", f"Bearer {w.tokens[k][:-1]}"),
        ("garbage", f"Bearer {w.tokens[k]}, Bearer {ADMIN}"),
    ]))
    forged_payload = base64.urlsafe_b64encode(
        json.dumps({"k": "device", "s": w.device_id, "e": 2**40, "n": "0"}).encode()).rstrip(b"=").decode()
    garbage = st.one_of(
        header_text,
        header_text.map(lambda t: "Bearer " + t),
        st.tuples(header_text, header_text).map(lambda t: f"Bearer {t[0]}.{t[1]}"),  # shaped like payload.mac
        st.sampled_from([f"Bearer {forged_payload}.AAAA", f"Bearer {forged_payload}.", f"Bearer .{forged_payload}",
                         "Bearer " + "a." * 600, f"Bearer {ADMIN.upper()}", f"Bearer {ADMIN} x"]),
    ).map(lambda v: ("garbage", v))
    right = st.sampled_from(RIGHT_CREDENTIALS[route_kind]).map(
        lambda k: ("none", None) if k == "none" else (k, f"Bearer {w.tokens[k]}"))
    return _weighted((5, right), (1, st.just(("none", None))), (2, real), (2, garbage)).map(
        lambda kv: (kv[0], None if kv[1] is None else kv[1].encode("latin-1", "replace")))


def _ranges() -> st.SearchStrategy[str | None]:
    valid = ["bytes=0-9", "bytes=-5", "bytes=5-", "bytes=0-0", "bytes=0-" + "9" * 19, "bytes=2999-", "bytes=-99999"]
    bad = ["bytes=", "bytes=-", "bytes=9-1", "bytes=99999999-", "bytes=0-1,2-3", "items=0-1", "bytes=" + "9" * 20 + "-",
           "bytes=-0", "bytes = 0-1", "BYTES=0-1", "bytes=+1-2", "bytes=٣-4", "bytes=0-9\t"]
    return st.one_of(st.none(), st.sampled_from(valid + bad), header_text)


def _path_values(w: World, key: tuple[str, str]) -> dict[str, st.SearchStrategy[str]]:
    sha, other_sha = w.release["sha256"], w.other_release["sha256"]
    fleets = [FLEET, OTHER, "fresh-fleet", "Z" * 64, "f"]
    if key[1] == "/v1/blobs/{sha256}":
        return {"sha256": _or_hostile([sha, other_sha, "0" * 64, sha.upper(), sha + "\n"])}
    if key[1] == "/tuf/{fleet}/targets/{name}":
        names = [f"{sha}.{w.release['target']}", f"{other_sha}.{w.other_release['target']}", f"{sha}.x",
                 f"{'0' * 64}.x", w.release["target"], f"{sha}.ekb\n"]
        return {"fleet": _or_hostile(fleets), "name": _or_hostile(names)}
    if key[1] == "/tuf/{fleet}/{name}":
        names = ["timestamp.json", "1.root.json", "1.snapshot.json", "1.targets.json", "2.targets.json",
                 "2.root.json", "0000000001.root.json", "root.json", "targets.json", "timestamp.json\n"]
        return {"fleet": _or_hostile(fleets), "name": _or_hostile(names)}
    if "{fleet}" in key[1]:
        return {"fleet": _or_hostile(fleets)}
    return {}


def _query(w: World, key: tuple[str, str]) -> st.SearchStrategy[list[tuple[str, str]]]:
    """Known query parameters (valid, hostile or missing), sometimes repeated, plus unknown ones."""
    known: dict[str, st.SearchStrategy[str]] = {}
    if key[1] == "/v1/fleets/{fleet}/releases":
        name = _weighted((3, st.from_regex(NAME, fullmatch=True)), (1, hostile_text))
        known = {"name": name, "version": name}
    elif key[1] == "/v1/samples":
        depth = st.one_of(st.sampled_from([999, 1000, 1500, 1990]), st.integers(1, 1990))
        nested = depth.map(lambda n: '{"a":' + "[" * n + "]" * n + "}")
        known = {"meta": _weighted(
            (2, st.dictionaries(st.text(max_size=8), json_scalars, max_size=4).map(lambda d: json.dumps(d))),
            (1, st.sampled_from(["{}", "[]", "null", "1", '"x"', "{", '{"a": NaN}', "{" + '"a":1,' * 800 + "}",
                                 "x" * 4001])),
            (1, nested), (1, hostile_text))}
    pairs = [st.one_of(st.none(), v.map(lambda x, k=k: (k, x))) for k, v in known.items()]
    extra = st.lists(st.tuples(hostile_text, hostile_text), max_size=2)
    return st.tuples(st.tuples(*pairs), extra, st.booleans()).map(
        lambda t: [p for p in t[0] if p is not None] * (2 if t[2] else 1) + t[1])


def _desired_extras() -> st.SearchStrategy[tuple[list[tuple[str, str]], str | None]]:
    """(query, If-None-Match): the current ETag only with a zero wait (a match otherwise long-polls)."""
    zero = st.sampled_from(["0", "0.0", "-0", "0e5", "+0"])
    waits = st.one_of(st.sampled_from(["61", "-1", "nan", "inf", "-inf", "1e309", "60.0001", "1_0", "0x1"]),
                      hostile_text)
    garbage = header_text.filter(lambda v: len(v.strip().strip('"')) != 16)
    return st.one_of(
        st.tuples(st.one_of(st.none(), zero), st.sampled_from(["CURRENT", "CURRENT-QUOTED", None])),
        st.tuples(st.one_of(st.none(), waits), st.one_of(st.none(), garbage)),
    ).map(lambda t: ([] if t[0] is None else [("wait", t[0])], t[1]))


def _json_body(w: World, key: tuple[str, str], components: dict, schema: dict) -> st.SearchStrategy[object]:
    hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
    ids = st.sampled_from([w.device_id, w.other_id, w.ghost_id])
    overrides: dict[str, st.SearchStrategy] = {}
    valid: st.SearchStrategy[object] = st.nothing()
    if key[1] == "/v1/enroll":
        overrides = {"token": st.sampled_from(w.enroll_tokens), "public_key": st.one_of(
            hex64, st.sampled_from([w.pub, w.other_pub]))}
        valid = st.fixed_dictionaries({"token": overrides["token"], "public_key": overrides["public_key"]},
                                      optional={"name": st.text(max_size=100)})
    elif key[1] == "/v1/auth/challenge":
        overrides = {"device_id": ids}
        valid = st.fixed_dictionaries({"device_id": ids})
    elif key[1] == "/v1/auth/token":
        pairs = st.sampled_from(w.nonces)
        overrides = {"device_id": ids, "nonce": pairs.map(lambda p: p[0]), "signature": pairs.map(lambda p: p[1])}
        valid = pairs.map(lambda p: {"device_id": w.device_id, "nonce": p[0], "signature": p[1]})
    elif key[1] == "/v1/fleets/{fleet}/rollouts":
        release_ids = st.one_of(st.integers(1, 6), st.sampled_from([2**31, 2**63 - 1, 2**63, 10**20]))
        stages = st.sampled_from([[100], [1, 10, 50, 100], [50, 100], [100, 100], [0, 100], [1, 2], []])
        overrides = {"release_id": release_ids, "stages": stages}
        big = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**20])
        valid = st.fixed_dictionaries({"release_id": _weighted((3, st.integers(1, 6)), (1, big))},
                                      optional={"stages": stages, "stage_minutes": st.floats(0, 100)})
    if valid.is_empty:
        return _weighted((4, _object(components, schema, overrides)), (1, json_values))
    return _weighted((4, valid), (4, _object(components, schema, overrides)), (1, json_values))


@st.composite
def _request(draw: st.DrawFn, w: World, key: tuple[str, str]) -> Req:
    method, template = key
    op = w.app.openapi()["paths"][template][method.lower()]
    components = w.app.openapi().get("components", {}).get("schemas", {})
    path = template
    for name, values in _path_values(w, key).items():
        mode = draw(st.sampled_from(["plain", "dots", "raw"]), label=f"{name} encoding")
        path = path.replace("{" + name + "}", _encode_segment(draw(values, label=name), mode))
    query = draw(_query(w, key), label="query")
    headers: dict[str, bytes] = {}
    kind, value = draw(_auth(w, ROUTES[key]), label="auth")
    if value is not None:
        headers["Authorization"] = value
    params = {p["name"] for p in op.get("parameters", [])}
    if "range" in params and (rng := draw(_ranges(), label="range")) is not None:
        headers["Range"] = rng.encode("latin-1", "replace")
    if template == "/v1/desired":
        extra_query, inm = draw(_desired_extras(), label="wait, If-None-Match")
        query += extra_query
        if inm in ("CURRENT", "CURRENT-QUOTED"):
            r = w.client.get("/v1/desired", headers=w.auth("device"))
            etag = r.headers["etag"]
            inm = etag if inm == "CURRENT-QUOTED" else etag.strip('"')
        if inm is not None:
            headers["If-None-Match"] = inm.encode("latin-1", "replace")
    # the body
    json_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if template in RAW_BODY_LIMITS:
        limit = RAW_BODY_LIMITS[template]
        sized = st.tuples(st.sampled_from([0, 1, limit - 1, limit, limit + 1, 3 * limit]), st.integers(0, 255))
        content = draw(st.one_of(st.binary(max_size=300), sized.map(lambda t: bytes([t[1]]) * t[0])), label="body")
        declared = draw(st.sampled_from([None, None, "0", "1", str(limit + 1), "9" * 30, str(len(content))]))
        if declared is not None:
            headers["Content-Length"] = declared.encode()
    elif json_schema is not None:
        obj = draw(_json_body(w, key, components, json_schema), label="json")
        content = draw(_weighted((12, st.just(_dump(obj))), (2, st.binary(max_size=200)), (2, st.text(max_size=60).map(
            lambda t: t.encode("utf-8", "surrogatepass"))), (1, st.just(b"[" * 3000))), label="body")
    else:
        content = draw(st.one_of(st.none(), st.binary(max_size=64), json_values.map(_dump)), label="body")
    ctype = draw(_weighted((3, st.just("application/json")), (1, content_type)), label="content-type")
    if ctype is not None:
        headers["Content-Type"] = ctype.encode()
    if query:
        raw_query = "&".join(quote(k, safe="", errors="surrogatepass") + "=" + quote(v, safe="", errors="surrogatepass")
                             for k, v in query)
        path += "?" + raw_query
    assume(len(path) < 60_000)  # httpx refuses longer URLs (uvicorn's parsers far shorter ones)
    return Req(method, path, headers, content, kind)


# -- the oracle ---------------------------------------------------------------------------------------------------


def _json_ctype(headers: dict[str, bytes]) -> bool:
    ct = headers.get("Content-Type", b"").decode("latin-1").split(";")[0].strip().lower()
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


def _json_failure(content: bytes | None) -> str | None:
    """How FastAPI's json.loads of this body fails: "syntax" (a JSONDecodeError), "other" (not UTF-8, too deep)."""
    if not content:
        return None
    try:
        json.loads(content)
    except json.JSONDecodeError:
        return "syntax"
    except (ValueError, RecursionError):
        return "other"
    return None


def _denial(auth: str, kind: str, fleet: str | None) -> int | None:
    """The status the credentials must get on a route of this ``kind``; None when they are enough; 0: any 4xx."""
    device_fleet = {"device": FLEET, "other": OTHER}
    if kind == "public":
        return None
    if kind == "admin":
        return None if auth == "admin" else 401
    if kind == "device":
        return None if auth in device_fleet else 0 if auth == "ghost" else 401
    if auth == "admin":  # tuf
        return None
    if auth in device_fleet:
        return None if device_fleet[auth] == fleet else 403
    return 404 if auth == "ghost" else 401



def check(w: World, req: Req, resp) -> None:  # noqa: ANN001 - httpx.Response
    status, where = resp.status_code, f"{req!r} -> {resp.status_code} {resp.content[:300]!r}"
    assert status < 500, where
    assert SENTINEL not in resp.content and b"root:x:0:0" not in resp.content, where
    path = _server_path(resp)
    m, route, path_params = _match(w.app, path, req.method)
    key = (req.method, route.path) if m == Match.FULL else None
    if 400 <= status < 500:
        assert resp.headers.get("content-type", "").startswith("application/json"), where
        body = resp.json()
        assert isinstance(body, dict), where
        if "error" in body:
            assert set(body) <= {"error", "hint"} and isinstance(body["error"], str) and body["error"], where
        else:
            pytest.fail(f"a {status} without an 'error' key: {where}")
    if status == 307:  # Starlette's redirect_slashes: the same path without (or with) the trailing slash
        loc = resp.headers["location"]
        assert m == Match.NONE and loc.startswith(("http://testserver/v1/", "http://testserver/tuf/")), where
        return
    assert status in (200, 206, 304) or 400 <= status < 500, where
    if key is None:  # a routing error, checked above
        assert status in (404, 405), where
        return
    if key not in ROUTES:  # FastAPI's docs (the unknown-paths fuzzer can land there)
        return
    denial = _denial(req.auth, ROUTES[key], path_params.get("fleet"))
    if status < 400:
        assert denial is None, f"succeeded without the right credentials: {where}"
        _check_success(w, key, req, resp, path_params, where)
        return
    if denial:  # the credentials must be the reason, unless FastAPI refused the JSON body before any dependency ran
        has_body = "requestBody" in w.app.openapi()["paths"][key[1]][key[0].lower()]
        early = status == 422 and has_body and _json_ctype(req.headers) and _json_failure(req.content) is not None
        assert status == denial or early, where


def _check_success(w: World, key: tuple[str, str], req: Req, resp, params: dict, where: str) -> None:  # noqa: ANN001
    template = key[1]
    if template == "/health":
        assert resp.json() == {"ok": True}, where
    elif template in ("/fleet", "/fleet/"):  # the fleet page: HTML that holds no data
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html"), where
    elif template in ("/v1/blobs/{sha256}", "/tuf/{fleet}/targets/{name}"):
        sha = params["sha256"] if "sha256" in params else params["name"][:64]
        fleet = params.get("fleet") or {"device": FLEET, "other": OTHER}[req.auth]
        with w.svc.sessions() as s:
            assert s.query(Release.id).filter(Release.fleet == fleet, Release.sha256 == sha).first(), where
        blob = _blob(w, sha)
        if resp.status_code == 200:
            assert resp.content == blob, where
        else:
            assert resp.status_code == 206, where
            cr = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers["content-range"])
            start, end, size = map(int, cr.groups())
            assert size == len(blob) and resp.content == blob[start : end + 1], where
    elif template == "/tuf/{fleet}/{name}":
        assert resp.status_code == 200 and "signed" in resp.json(), where
    elif template == "/v1/desired":
        if resp.status_code == 304:
            assert req.headers.get("If-None-Match", b"").decode().strip('"') == resp.headers["etag"].strip('"'), where
        else:
            assert resp.status_code == 200 and "desired" in resp.json(), where
    elif template == "/v1/fleets/{fleet}/jobs" and req.method == "GET":
        assert resp.status_code == 200 and isinstance(resp.json(), list), where
    else:
        assert resp.status_code == 200 and isinstance(resp.json(), dict), where
    if "fleet" in params:  # nothing is created or found under a fleet name the service should refuse
        assert re.fullmatch(NAME_CHARS, params["fleet"]), where
    body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else None
    for k in ("fleet", "name", "version"):
        if template.startswith("/v1/fleets/") and isinstance(body, dict) and isinstance(body.get(k), str):
            assert re.fullmatch(NAME_CHARS, body[k]), where


@contextlib.contextmanager
def _server_recursion_limit():  # noqa: ANN202
    """Hypothesis raises the recursion limit while a test runs (by thousands of frames), which would hide a
    RecursionError that a server, at Python's default of 1000, raises: e.g. json.loads of deeply nested input."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(SERVER_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def send(w: World, key: tuple[str, str], req: Req):  # noqa: ANN201 - httpx.Response or None for a known crash
    PG_REFUSALS.clear()
    try:
        with _server_recursion_limit():
            resp = w.client.request(req.method, req.url, headers=req.headers, content=req.content)
    except Exception as exc:
        for name, (kind, fragment, routes) in KNOWN_CRASHES.items():
            if isinstance(exc, kind) and fragment in str(exc) and key in routes:
                KNOWN_HITS[name] += 1
                return None
        raise AssertionError(f"5xx: {req!r} raised in the app") from exc
    for refusal in PG_REFUSALS:
        known = [n for n, (fragment, routes) in KNOWN_PG_REFUSALS.items() if fragment in refusal and key in routes]
        assert known, f"a 5xx on PostgreSQL: {refusal}: {req!r} -> {resp.status_code}"
        KNOWN_HITS[known[0]] += 1
    return resp


# -- the fuzz tests -----------------------------------------------------------------------------------------------
def test_fuzzers_cover_every_route(world: World):
    """A route added to the app without a fuzzer here fails this test (and one hidden from the spec too)."""
    spec = {(m.upper(), p) for p, ops in world.app.openapi()["paths"].items() for m in ops}
    assert spec == set(ROUTES), f"routes without a fuzzer: {spec - set(ROUTES)}; gone: {set(ROUTES) - spec}"
    served = {(m, r.path) for r in world.app.routes if r.path not in DOCS_ROUTES for m in (r.methods or ()) - {"HEAD"}}
    assert served == spec, f"routes served but not in the OpenAPI spec: {served - spec}"


@pytest.mark.parametrize("key", sorted(ROUTES), ids=lambda k: f"{k[0]} {k[1]}" if isinstance(k, tuple) else k)
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_route(world: World, key: tuple[str, str], data: st.DataObject):
    req = data.draw(_request(world, key), label="request")
    resp = send(world, key, req)
    STATUSES[f"{key[0]} {key[1]}"][500 if resp is None else resp.status_code] += 1
    if resp is not None:
        check(world, req, resp)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_unknown_paths_and_methods(world: World, data: st.DataObject):
    """Methods a route does not have, and paths no route has: 404/405 with the error body."""
    method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    prefix = data.draw(st.sampled_from(["/", "/v1/", "/v2/", "/tuf/", "/v1/fleets/", "/v1/blobs/"]))
    tail = data.draw(hostile_text.map(lambda t: _encode_segment(t, "plain")))
    kind, value = data.draw(_auth(world))
    req = Req(method, prefix + tail, {} if value is None else {"Authorization": value}, None, kind)
    resp = send(world, ("?", "?"), req)
    STATUSES["(unknown paths and methods)"][resp.status_code] += 1
    check(world, req, resp)



"""The sync service's answers to bad requests, exactly: traversal, oversized bodies, wrong credentials, malformed
bodies, bad ranges; and the defects the fuzzer (``tests/test_sync_fuzz.py``) found, each guarded against its return."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.routing import Match

from edgekit.sync.db import Release
from tests.sync_fuzz_world import (  # noqa: F401 - world is a fixture
    BUNDLE_LIMIT,
    FLEET,
    OTHER,
    PG_REFUSALS,
    ROUTES,
    SAMPLE_LIMIT,
    SENTINEL,
    World,
    _blob,
    _match,
    _server_path,
    world_fixture,
)

# -- named tests with exact expectations --------------------------------------------------------------------------
TRAVERSALS = ["..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%5C..%5Cetc%5Cpasswd", "..%2Fsecret.txt",
              "%2E%2E%2Fsecret.txt", "..%252F..%252Fsecret.txt", "tmp%2Fsecret.txt", "secret.txt", "%2Fetc%2Fpasswd",
              "%2e%2e", "..%00", "%00"]


@pytest.mark.parametrize("auth", ["device", "admin"])
def test_blob_path_traversal_is_404(world: World, auth: str):
    for t in TRAVERSALS:
        r = world.client.get(f"/v1/blobs/{t}", headers=world.auth(auth))
        assert SENTINEL not in r.content and b"root:" not in r.content, t
        # an admin token is not a device token: 401 once the path reaches the route
        reached = _match(world.app, _server_path(r), "GET")[0] == Match.FULL
        assert r.status_code == (401 if auth == "admin" and reached else 404), (t, r.text)


@pytest.mark.parametrize("auth", ["device", "admin"])
def test_tuf_path_traversal_is_404(world: World, auth: str):
    for t in TRAVERSALS + ["1.root.json%00", "timestamp.json%0A", "..%2F" + OTHER + "%2Ftimestamp.json"]:
        for url in (f"/tuf/{FLEET}/{t}", f"/tuf/{FLEET}/targets/{t}"):
            r = world.client.get(url, headers=world.auth(auth))
            assert SENTINEL not in r.content and b"root:" not in r.content, url
            assert r.status_code in (404, 422), (url, r.status_code, r.text)
    # a target's hash followed by a traversal (any plain suffix after the hash serves that release's blob)
    for t in ["..%2F..%2Fsecret.txt", "..%5C..%5Csecret.txt", "x%2F..%2F..%2Fsecret.txt", "x%00", "ekb%2F..%2Fx"]:
        r = world.client.get(f"/tuf/{FLEET}/targets/{world.release['sha256']}.{t}", headers=world.auth(auth))
        assert SENTINEL not in r.content and r.status_code == 404, (t, r.text)
    # traversal in the fleet segment: an admin finds nothing, a device is in another fleet
    for t in ["..", "%2e%2e", "..%2F" + FLEET, FLEET + "%2F..", "%2Fetc"]:
        r = world.client.get(f"/tuf/{t}/timestamp.json", headers=world.auth(auth))
        assert SENTINEL not in r.content and r.status_code in ((404,) if auth == "admin" else (403, 404)), (t, r.text)


def _store_files(w: World) -> set[Path]:
    return {p for p in (w.root / "blobs").rglob("*") if p.is_file()}


def test_oversized_release_upload_is_413(world: World):
    admin = {**world.auth("admin"), "Content-Type": "application/octet-stream"}
    before = _store_files(world)
    with world.svc.sessions() as s:
        releases = s.query(Release).count()
    body = b"\x07" * (BUNDLE_LIMIT + 1)
    r = world.client.post(f"/v1/fleets/{FLEET}/releases?name=big&version=big-1", content=body, headers=admin)
    assert r.status_code == 413 and r.json()["error"], r.text
    # no Content-Length (chunked): refused while streaming
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    r = world.client.post(f"/v1/fleets/{FLEET}/releases?name=big&version=big-2", content=chunks, headers=admin)
    assert r.status_code == 413 and r.json()["error"], r.text
    # a Content-Length that lies low does not get more through
    r = world.client.post(f"/v1/fleets/{FLEET}/releases?name=big&version=big-3", content=body,
                          headers={**admin, "Content-Length": "10"})
    assert r.status_code == 413, r.text
    assert _store_files(world) == before  # nothing kept, not even a partial upload
    with world.svc.sessions() as s:
        assert s.query(Release).count() == releases
    r = world.client.post(f"/v1/fleets/{FLEET}/releases?name=big&version=big-4", content=body[:-1], headers=admin)
    assert r.status_code == 200 and r.json()["size"] == BUNDLE_LIMIT, r.text  # the limit itself is allowed


def test_oversized_sample_is_413(world: World):
    h = {**world.auth("device"), "Content-Type": "application/octet-stream"}
    before = _store_files(world)
    body = b"s" * (SAMPLE_LIMIT + 1)
    r = world.client.post("/v1/samples", content=body, headers=h)
    assert r.status_code == 413 and r.json()["error"], r.text
    r = world.client.post("/v1/samples", content=(body[i : i + 1000] for i in range(0, len(body), 1000)), headers=h)
    assert r.status_code == 413 and r.json()["error"], r.text
    assert _store_files(world) == before
    r = world.client.post("/v1/samples", content=body[:-1], headers=h)
    assert r.status_code == 200 and r.json()["size"] == SAMPLE_LIMIT, r.text


def test_other_fleets_device_gets_403_on_tuf(world: World):
    sha, target = world.release["sha256"], world.release["target"]
    for name in ["timestamp.json", "1.root.json", "1.snapshot.json", "1.targets.json", "targets/" + f"{sha}.{target}"]:
        r = world.client.get(f"/tuf/{FLEET}/{name}", headers=world.auth("other"))
        assert r.status_code == 403 and r.json()["error"], (name, r.text)
        assert world.client.get(f"/tuf/{FLEET}/{name}", headers=world.auth("device")).status_code == 200, name
    r = world.client.get(f"/tuf/{OTHER}/timestamp.json", headers=world.auth("device"))
    assert r.status_code == 403, r.text
    assert world.client.get(f"/tuf/{OTHER}/timestamp.json", headers=world.auth("other")).status_code == 200
    # a device's blob route never serves another fleet's release either
    r = world.client.get(f"/v1/blobs/{world.other_release['sha256']}", headers=world.auth("device"))
    assert r.status_code == 404, r.text


@pytest.mark.parametrize("auth", ["device", "other", "challenge", "expired", "enroll"])
def test_admin_routes_refuse_device_tokens(world: World, auth: str):
    admin_routes = [k for k, v in ROUTES.items() if v == "admin"]
    assert len(admin_routes) == 12
    for method, template in admin_routes:
        url = template.replace("{fleet}", FLEET) + ("?name=x&version=admin-test" if "releases" in template else "")
        body = b'{"release_id": 1, "stages": [100]}' if "rollouts" in template and "abort" not in template else b"{}"
        r = world.client.request(method, url, content=body,
                                 headers={**world.auth(auth), "Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"] == "an admin token is required", (method, url, r.text)


def test_malformed_json_body_is_422(world: World):
    auth = {"/v1/heartbeat": "device", "/v1/fleets/{fleet}/tokens": "admin", "/v1/fleets/{fleet}/rollouts": "admin"}
    json_routes = [(m, p) for (m, p) in ROUTES
                   if "requestBody" in world.app.openapi()["paths"][p][m.lower()]
                   and "application/json" in world.app.openapi()["paths"][p][m.lower()]["requestBody"]["content"]]
    assert len(json_routes) == 7
    for method, template in json_routes:
        headers = {"Content-Type": "application/json"}
        if template in auth:
            headers.update(world.auth(auth[template]))
        for body in [b"{not json", b'{"a": 1,}', b"[", b'{"token": "x"', b"\"unterminated", b"{'a': 1}"]:
            r = world.client.request(method, template.replace("{fleet}", FLEET), content=body, headers=headers)
            assert r.status_code == 422, (template, body, r.text)
            assert r.json()["error"] == "invalid request" and "JSON decode error" in r.json()["hint"], r.text


@pytest.mark.parametrize("route", ["blob", "target"])
def test_bad_range_is_416(world: World, route: str):
    sha, target = world.release["sha256"], world.release["target"]
    url = f"/v1/blobs/{sha}" if route == "blob" else f"/tuf/{FLEET}/targets/{sha}.{target}"
    blob = _blob(world, sha)
    h = world.auth("device")
    for rng in ["bytes=99999999-", f"bytes={len(blob)}-", "bytes=9-1", "bytes=abc", "bytes=0-1,3-4", "items=0-5",
                "bytes=-", "bytes=", "bytes=-0", "bytes=" + "9" * 20 + "-", "0-5"]:
        r = world.client.get(url, headers={**h, "Range": rng})
        assert r.status_code == 416 and r.json()["error"], (rng, r.status_code, r.text)
    r = world.client.get(url, headers={**h, "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == blob[:10] and r.headers["content-range"] == f"bytes 0-9/{len(blob)}"
    r = world.client.get(url, headers={**h, "Range": "bytes=-7"})
    assert r.status_code == 206 and r.content == blob[-7:]


def test_desired_answers_304_for_its_etag(world: World):
    h = world.auth("device")
    r = world.client.get("/v1/desired", headers=h)
    assert r.status_code == 200
    r2 = world.client.get("/v1/desired?wait=0", headers={**h, "If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and r2.content == b""


# -- defects the fuzzer found, fixed; each test fails if its defect comes back -------------------------------------
ROUTING_404 = {"detail": "Not Found"}  # what FastAPI answered before app.py handled routing errors
ROUTING_405 = {"detail": "Method Not Allowed"}
BODY_PARSE_400 = {"detail": "There was an error parsing the body"}


def _defect(present: bool, reason: str) -> None:
    """A defect the fuzzer found (and that was fixed): its return fails the test."""
    assert not present, f"regression: {reason}"


def test_routing_errors_use_the_error_body(world: World):
    for method, url, status in [("GET", "/v1/nope", 404), ("DELETE", "/health", 405), ("PUT", "/tuf/f/x", 405)]:
        r = world.plain.request(method, url)
        assert r.status_code == status, r.text
        _defect(r.json() in (ROUTING_404, ROUTING_405), "FastAPI's routing 404/405 answer {'detail': ...}, not the "
                "{'error', 'hint'} body app.py promises (no exception handler for Starlette's HTTPException)")
        assert r.json()["error"], r.text


@pytest.mark.parametrize("body", [b"\xff\xfe{", b'{"token": "\xe9"}', b"[" * 5000 + b"]" * 5000],
                         ids=["utf16-bom", "latin1", "deep"])
def test_undecodable_json_body_is_a_422(world: World, body: bytes):
    r = world.plain.post("/v1/enroll", content=body, headers={"Content-Type": "application/json"})
    _defect(r.json() == BODY_PARSE_400, "a JSON body that is not UTF-8 or nests too deep is a 400 "
            "{'detail': 'There was an error parsing the body'}, not a 422 {'error'}")
    assert r.status_code == 422 and r.json()["error"], r.text


def test_rollout_release_id_beyond_int64(world: World):
    r = world.plain.post(f"/v1/fleets/{FLEET}/rollouts", content=b'{"release_id": 9223372036854775808}',
                         headers={**world.auth("admin"), "Content-Type": "application/json"})
    _defect(r.status_code == 500, "RolloutCreate.release_id has no upper bound: 2**63 reaches SQLite, which raises "
            "OverflowError (500); on PostgreSQL (Integer column) anything past 2**31-1 would fail")
    assert r.status_code in (404, 422) and r.json()["error"], r.text


def test_sample_meta_nested_too_deep(world: World):
    meta = '{"a":' + "[" * 1990 + "]" * 1990 + "}"
    r = world.plain.post("/v1/samples", params={"meta": meta}, content=b"x", headers=world.auth("device"))
    _defect(r.status_code == 500, "samples: json.loads(meta) raises RecursionError, not ValueError, for a deeply "
            "nested ?meta= within its 4000 characters: 500")
    assert r.status_code == 422 and r.json()["error"], r.text


@pytest.mark.parametrize("url", ["/v1/desired", f"/tuf/{FLEET}/timestamp.json"])
def test_non_ascii_token_mac(world: World, url: str):
    r = world.plain.get(url, headers={"Authorization": b"Bearer abc.\xe9"})
    _defect(r.status_code == 500, "auth.Macs.check hands a non-ASCII MAC to hmac.compare_digest, which raises "
            "TypeError: every device and TUF route answers 500")
    assert r.status_code == 401 and r.json()["error"], r.text


def test_sample_from_a_device_that_is_gone(world: World):
    r = world.plain.post("/v1/samples", content=b"x", headers=world.auth("ghost"))
    _defect(r.status_code == 500, "samples: a valid device token whose device row is gone reaches "
            "Service.add_sample, which reads None.samples_day: 500 (the other device routes answer 404)")
    assert r.status_code in (401, 404) and r.json()["error"], r.text


def test_fleet_name_with_trailing_newline_is_refused(world: World):
    r = world.plain.post("/v1/fleets/newline-fleet%0A/tokens", json={}, headers=world.auth("admin"))
    _defect(r.status_code == 200, "fleet names are checked with re.match against NAME, whose '$' also matches "
            "before a trailing newline: fleet 'newline-fleet\\n' is created")
    assert r.status_code == 422 and r.json()["error"], r.text


def test_sample_meta_nan_is_refused(world: World):
    PG_REFUSALS.clear()
    r = world.plain.post("/v1/samples", params={"meta": '{"a": NaN, "b": -Infinity}'}, content=b"x",
                         headers=world.auth("device"))
    _defect(bool(PG_REFUSALS), "samples: ?meta= goes through json.loads, which takes NaN and Infinity; SQLite stores "
            "them, PostgreSQL's json type refuses them: DataError, 500 (seen on PostgreSQL 15)")
    assert r.status_code == 422 and r.json()["error"], r.text


@pytest.mark.parametrize("url", ["/tuf/a%00b/timestamp.json", f"/tuf/a%00b/targets/{'0' * 64}.x"])
def test_nul_in_a_tuf_fleet_never_reaches_the_database(world: World, url: str):
    PG_REFUSALS.clear()
    r = world.plain.get(url, headers=world.auth("admin"))
    _defect(bool(PG_REFUSALS), "TUF routes: an admin's fleet path parameter is not validated, so 'a\\x00b' reaches "
            "the query; PostgreSQL refuses NUL in text: DataError, 500 (seen on PostgreSQL 15)")
    assert r.status_code in (404, 422) and r.json()["error"], r.text


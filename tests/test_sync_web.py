"""The sync service's fleet web page: its admin JSON over HTTP, and the page itself in a real headless Chromium
(sign in, choose a fleet, read the tables, open a rollout's details, abort it). The page's screenshot is checked in
a temporary folder; ``EDGEKIT_UPDATE_SCREENSHOT=1`` also copies it to ``benchmarks/results/fleet_page.png``."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import shutil
import struct
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.browser import browser, page  # noqa: F401 - fixtures
from tests.sync_server import ADMIN, LiveServer

ROOT = Path(__file__).resolve().parent.parent
FLEET = "cameras"
FULL_SIZE, DELTA_SIZE = 200_000, 5_000  # the delta is 2.5 % of the full bundle
NAMES = ["cam-1", "cam-2", "lobby <b>3</b>", "dock & \"4\"", "<img src=x onerror=alert(1)>", "cam-6"]


def _req(url: str, method: str = "GET", token: str | None = ADMIN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A live server with a fleet: release 1 rolled out everywhere, release 2 (with a delta against 1) in an active
    rollout at stage 1 of [50, 100]; devices on both versions, some with the drift alarm on, one never seen, one
    offline; a cloud job; and a second, empty fleet."""
    from edgekit.sync.db import Device, Job, Release
    from edgekit.sync.protocol import Gates, Heartbeat, RolloutCreate

    with LiveServer(tmp_path_factory.mktemp("web") / "server") as srv:
        svc = srv.service
        r1 = svc.publish(FLEET, io.BytesIO(b"1" * FULL_SIZE), "tiny", "1")
        r2 = svc.publish(FLEET, io.BytesIO(b"2" * FULL_SIZE), "tiny", "2")
        devices = []
        for i, name in enumerate(NAMES):
            tok, _ = svc.enroll_token(FLEET, 600)
            devices.append(svc.enroll(tok, f"{i + 1:064x}", name)[0].id)
        svc.enroll_token("empty-fleet", 600)
        svc.start_rollout(FLEET, RolloutCreate(release_id=r1.id, stages=[100], stage_minutes=0))
        for d in devices[:-1]:  # the last one never heartbeats: no version
            svc.heartbeat(d, Heartbeat(version="1", telemetry={"requests": 50, "latency_p90_ms": 4.0}))
        assert svc.tick() == {FLEET: "completed"}
        with svc.sessions.begin() as s:
            rel = s.get(Release, r2.id)
            rel.base_release_id, rel.delta_size, rel.origin = r1.id, DELTA_SIZE, "job 1"
            rel.delta_target, rel.delta_sha256 = "tiny-2.from-1.ekd", "d" * 64
            s.add(Job(fleet=FLEET, kind="adapt", key="k" * 64, status="running", step="distill", attempts=2,
                      error="", runner="worker-a"))
        gates = Gates(max_error_rate=0.1, max_drift_share=0.9, min_reports=2)
        svc.start_rollout(FLEET, RolloutCreate(release_id=r2.id, stages=[50, 100], gates=gates, stage_minutes=60))
        with svc.sessions() as s:
            wanted = {d: svc.desired(s, s.get(Device, d)).version for d in devices[:-1]}
        for i, (d, v) in enumerate(wanted.items()):
            drift = i % 2 == 0
            svc.heartbeat(d, Heartbeat(version=v, telemetry={"requests": 100, "errors": i, "latency_p50_ms": 2.0,
                                                             "latency_p90_ms": 5.0 + i, "drift_alarm": drift}))
        with svc.sessions.begin() as s:  # one device went quiet an hour ago
            s.get(Device, devices[0]).last_seen = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        versions: dict[str, int] = {}
        for v in [*wanted.values(), None]:
            versions[v or "(none)"] = versions.get(v or "(none)", 0) + 1
        yield {"srv": srv, "svc": svc, "devices": devices, "versions": versions, "r1": r1, "r2": r2,
               "drift": sum(i % 2 == 0 for i in range(len(wanted)))}


# -- HTTP ------------------------------------------------------------------------------------------------------------
def test_page_is_served_self_contained(world):
    url = world["srv"].url
    for path in ("/fleet", "/fleet/"):
        status, headers, body = _req(url + path, token=None)  # public: it holds no data
        assert status == 200 and headers["content-type"].startswith("text/html")
        html = body.decode()
        assert 'id="fleet-select"' in html and 'id="token"' in html
        assert not re.search(r"https?:|wss?:|\b(?:src|href)=(?![\"']data:)|@import|url\(", html, re.I), "no URL"
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'sha256-" in csp
        assert "unsafe-inline" not in csp


def test_admin_routes_need_the_admin_token(world):
    url = world["srv"].url
    for path in ("/v1/fleets", f"/v1/fleets/{FLEET}/overview"):
        for token in (None, "wrong-token"):
            status, _, body = _req(url + path, token=token)
            assert status == 401, path
            err = json.loads(body)
            assert err["error"] == "an admin token is required" and "Bearer" in err["hint"]
    status, _, body = _req(url + "/v1/fleets")
    assert status == 200
    assert json.loads(body)["fleets"] == [{"name": FLEET, "devices": len(NAMES)}, {"name": "empty-fleet", "devices": 0}]


def test_overview_errors(world):
    url = world["srv"].url
    status, _, body = _req(url + "/v1/fleets/no-such-fleet/overview")
    assert status == 404 and json.loads(body)["error"] == "no fleet 'no-such-fleet'"
    for bad in ("bad name!", "-starts-with-dash", "x" * 65, "caf\u00e9"):
        status, _, body = _req(url + f"/v1/fleets/{urllib.parse.quote(bad)}/overview")
        assert status == 422, bad
        assert "fleet names" in json.loads(body)["error"]


def test_overview_json(world, monkeypatch):
    from edgekit.sync import web

    status, _, body = _req(world["srv"].url + f"/v1/fleets/{FLEET}/overview")
    assert status == 200
    o = json.loads(body)
    dv = o["devices"]
    assert dv["total"] == len(NAMES) and dv["drift"] == world["drift"]
    assert dv["online"] == len(NAMES) - 2  # one never seen, one seen an hour ago
    assert {v["version"] or "(none)": v["devices"] for v in dv["by_version"]} == world["versions"]
    assert [d["name"] for d in dv["shown"]][-1] == NAMES[-1]  # never seen: last
    assert o["current_release"] == {"id": world["r1"].id, "version": "1"}
    latest, first = o["rollouts"]
    assert latest["status"] == "active" and latest["stages"] == [50, 100] and latest["stage"] == 0
    assert latest["gates"]["max_error_rate"] == 0.1 and latest["health"]["percent"] == 50
    assert first["status"] == "completed" and first["health"] is None
    r2 = next(r for r in o["releases"] if r["version"] == "2")
    assert r2["delta_share"] == DELTA_SIZE / FULL_SIZE and r2["base_version"] == "1" and r2["origin"] == "job 1"
    assert o["jobs"]["by_status"] == {"running": 1} and o["jobs"]["shown"][0]["step"] == "distill"
    monkeypatch.setattr(web, "DEVICES_SHOWN", 2)  # the list is capped; the totals still count every device
    o = json.loads(_req(world["srv"].url + f"/v1/fleets/{FLEET}/overview")[2])
    assert len(o["devices"]["shown"]) == 2 and o["devices"]["total"] == len(NAMES)


# -- the page in headless Chromium -----------------------------------------------------------------------------------
def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _cells(table, col: str) -> list[str]:
    return [t.strip() for t in table.locator(f'tbody td[data-col="{col}"]').all_inner_texts()]


def test_fleet_page_in_chromium(world, page, tmp_path):  # noqa: F811 - a fixture
    from playwright.sync_api import expect

    from edgekit.sync.rollout import latest_rollout

    srv, svc = world["srv"], world["svc"]
    page.goto(srv.url + "/fleet")
    expect(page.get_by_label("Admin token")).to_be_visible()

    page.get_by_label("Admin token").fill("not-the-token")  # refused: the form stays, with a message
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("message")).to_contain_text("refused")
    page.get_by_label("Admin token").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    fleet_select = page.get_by_role("combobox", name="Fleet")
    expect(fleet_select.locator("option")).to_have_count(3)
    fleet_select.select_option(FLEET)

    versions = page.locator("#versions-table")
    expect(versions.locator("tbody tr")).to_have_count(len(world["versions"]))
    shown = dict(zip(_cells(versions, "version"), map(int, _cells(versions, "devices"))))
    assert shown == world["versions"]
    expect(page.get_by_test_id("total-devices")).to_contain_text(str(len(NAMES)))
    expect(page.get_by_test_id("drift-devices")).to_contain_text(str(world["drift"]))
    expect(page.get_by_test_id("current-release")).to_contain_text("1")

    devices = page.locator("#devices-table")
    expect(devices.locator("tbody tr")).to_have_count(len(NAMES))
    assert sorted(_cells(devices, "name")) == sorted(NAMES)  # user input shown as text, never as markup
    assert devices.locator("tbody b, tbody img").count() == 0
    assert _cells(devices, "drift").count("drift") == world["drift"]
    assert _cells(devices, "online").count("offline") == 2

    releases = page.locator("#releases-table")
    row2 = releases.locator(f'tr[data-release-id="{world["r2"].id}"]')
    expect(row2.locator('[data-col="delta-share"]')).to_have_text("2.5 %")
    expect(row2.locator('[data-col="delta-base"]')).to_have_text("1")
    expect(row2.locator('[data-col="delta-size"]')).to_have_text("4.88 KiB")
    expect(releases.locator(f'tr[data-release-id="{world["r1"].id}"] [data-col="delta-share"]')).to_have_text("—")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    expect(page.locator('#jobs-table [data-col="status"]')).to_have_text("running")

    rollouts = page.locator("#rollouts-table tbody tr")
    expect(rollouts).to_have_count(2)
    active = page.locator('#rollouts-table tr[data-status="active"]')
    expect(active.locator('[data-col="stage"]')).to_have_text("1 of 2")
    expect(active.locator('[data-col="percent"]')).to_have_text("50 %")
    active.click()
    details = page.get_by_test_id("rollout-details")
    expect(details).to_be_visible()
    expect(page.get_by_test_id("rollout-stage-text")).to_contain_text("Stage 1 of 2")
    expect(page.locator("#rollout-stages li.current")).to_have_text("50 %")
    expect(page.locator('#rollout-gates tr[data-gate="max_error_rate"]')).to_contain_text("10.0 %")
    expect(page.locator('#rollout-gates tr[data-gate="min_reports"]')).to_contain_text("2")
    expect(page.get_by_test_id("progress-bar")).to_contain_text("targeted devices reporting")

    shot = tmp_path / "fleet_page.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    w, h = _png_size(data)
    assert w >= 1000 and h >= 800 and len(data) > 30_000, (w, h, len(data))
    if os.environ.get("EDGEKIT_UPDATE_SCREENSHOT"):  # refresh the committed picture on request only: a test run
        (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)  # must not rewrite tracked files
        shutil.copyfile(shot, ROOT / "benchmarks" / "results" / "fleet_page.png")

    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Abort rollout").click()
    expect(active).to_have_count(0)
    aborted = page.locator('#rollouts-table tbody tr').first
    expect(aborted.locator('[data-col="status"]')).to_have_text("aborted")
    expect(aborted.locator('[data-col="reason"]')).to_have_text("aborted by an admin")
    expect(page.get_by_role("button", name="Abort rollout")).to_be_hidden()
    with svc.sessions() as s:
        assert latest_rollout(s, FLEET).status == "aborted"
    # the only console errors: the refused token's 401s
    assert all("401" in e for e in page.errors), page.errors

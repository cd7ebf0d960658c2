"""The dashboard (``--dashboard-port``), in headless Chromium: workers, live counts from the
event stream, failures with their traceback; scaling and the token over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.pool_support import run_sync, wait_for
from tests.test_observe import observe_pool, send, send_many

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt if missing (as root); skipped if that fails."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
            capture_output=True,
            timeout=900,
            env=env,
        )
        found = shutil.which("chromium")
    if found is None:
        if os.environ.get("POOL_REQUIRE_SERVICES") == "1":
            pytest.fail("POOL_REQUIRE_SERVICES=1 but chromium is not installed", pytrace=False)
        pytest.skip("chromium is not installed and could not be")
    return found


class Page:
    """The dashboard in headless Chromium, driven over the DevTools protocol (aiohttp's
    websocket client): ``evaluate`` runs JavaScript in the page and returns its value."""

    def __init__(self, chromium: str, url: str, profile: Path) -> None:
        args = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--remote-debugging-port=0", "--window-size=1280,1000",
            f"--user-data-dir={profile}", url,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.next_id = 0

    async def __aenter__(self) -> Page:
        import aiohttp

        assert self.proc.stderr is not None
        loop = asyncio.get_running_loop()
        while True:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stderr.readline), 60)
            if not line:
                raise AssertionError("chromium exited before it listened")
            if b"DevTools listening on " in line:
                port = line.decode().split("127.0.0.1:")[1].split("/")[0]
                break
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            targets = await reply.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def evaluate(self, expression: str) -> Any:
        self.next_id += 1
        call = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        await self.ws.send_json({"id": self.next_id, "method": "Runtime.evaluate", "params": call})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), 30)
            if message.get("id") == self.next_id:
                return message["result"]["result"].get("value")

    async def wait(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)
        return value

    async def screenshot(self, path: Path) -> None:
        import base64

        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": "Page.captureScreenshot"})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), 30)
            if message.get("id") == self.next_id:
                path.write_bytes(base64.b64decode(message["result"]["data"]))
                return

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.kill()
        self.proc.wait(20)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


ROWS = "[...document.querySelectorAll('#workers tbody tr')].map(r => r.innerText)"


def test_the_page_shows_workers_live_events_failures_and_scales_the_pool(
    chromium: str, tmp_path: Path
) -> None:
    pytest.importorskip("aiohttp")
    with observe_pool(2, ["--dashboard-port", "0"]) as running:
        url = running.stats()["dashboard_url"]

        async def drive() -> None:
            async with Page(chromium, url, tmp_path / "profile") as page:
                await page.wait("document.body.dataset.live === 'yes'", "the event stream")
                wait_for(lambda: running.stats()["event_subscribers"] == 1, 20, "a subscriber")
                pids = [w["pid"] for w in running.stats()["workers"]]
                shown = await page.wait(f"{ROWS}.length === 2 && {ROWS}", "two workers")
                assert sorted(int(row.split()[1]) for row in shown) == sorted(pids)
                assert all("ready" in row for row in shown)

                done = await asyncio.to_thread(run_sync, send_many(running, "noop", 300))
                assert len(done) == 300
                failed = await asyncio.to_thread(run_sync, send(running, "fail", "in-the-page"))
                assert failed.is_err
                failure = await page.wait(
                    "document.querySelector('#failures details.failure')?.innerText",
                    "the failure",
                )
                assert "observe_app:fail" in failure and "ValueError: in-the-page" in failure
                trace = await page.evaluate("document.querySelector('#failures pre').textContent")
                assert "Traceback (most recent call last)" in trace
                await page.wait("rate.some(v => v > 0)", "a throughput point from the events")
                await page.wait("p50.some(v => v > 0)", "a latency point from the events")

                # scale from the page: its form posts to /api/scale
                await page.evaluate("el('target').value = 3; el('scale').requestSubmit(); true")
                await asyncio.to_thread(running.wait_ready, 3)
                await page.wait(f"{ROWS}.length === 3", "three workers on the page")
                if os.environ.get("POOL_DASHBOARD_SCREENSHOT"):
                    await page.screenshot(Path(os.environ["POOL_DASHBOARD_SCREENSHOT"]))

        run_sync(drive())
        wait_for(lambda: running.stats()["event_subscribers"] == 0, 20, "the page gone")
        running.stop()


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_scale_from_the_page_and_the_token_beyond_loopback() -> None:
    extra = ["--dashboard-port", "0", "--dashboard-addr", "0.0.0.0"]
    with observe_pool(1, extra) as running:
        url = running.stats()["dashboard_url"].replace("0.0.0.0", "127.0.0.1")
        token = (Path(running.run_dir) / "metrics.token").read_text()
        assert _call(f"{url}api/stats")[0] == 401
        assert _call(f"{url}api/stats?token={'x' * len(token)}")[0] == 401
        status, stats = _call(f"{url}api/stats?token={token}")
        assert status == 200 and stats["target_workers"] == 1
        assert _call(f"{url}api/scale?token={token}", {"workers": -1})[0] == 400
        assert _call(f"{url}api/scale?token={token}", {"workers": 2}) == (
            200,
            {"ok": True, "workers": 2},
        )
        running.wait_ready(2)
        running.stop()


def test_the_page_s_digest_is_bounded_whatever_the_rate_of_tasks() -> None:
    from pool.ops.dashboard import DURATIONS_KEPT, RUNNING_KEPT, RUNNING_SHOWN, _Digest
    from pool.runtime.events import Batch

    digest = _Digest(None)  # type: ignore[arg-type]
    digest.add(Batch([("started", 0.0, "app:noop", 0, [f"t{i}" for i in range(10)], [])]))
    for i in range(10, RUNNING_KEPT + 500):  # one event per batch, and many
        digest.add(Batch([("started", float(i), "app:noop", i % 2, [f"t{i}"], [])]))
    ended = [f"t{i}" for i in range(3000)]
    digest.add(Batch([("succeeded", 1.0, "app:noop", 1, ended, [i / 1000 for i in range(3000)])]))
    failed = {"event": "failed", "time": 2.0, "task_id": "x", "task_name": "app:fail",
              "worker": 0, "duration": 0.5, "error": "E", "traceback": "tb"}  # fmt: skip
    digest.add(Batch([failed]))
    taken = digest.take()
    assert taken["finished"] == 3001
    assert len(taken["durations"]) == DURATIONS_KEPT
    assert taken["durations"][-1] == 0.5  # the newest are kept
    assert taken["running"] == RUNNING_KEPT - 3000 + 500  # the oldest were forgotten
    assert len(taken["newest_running"]) == RUNNING_SHOWN
    assert taken["newest_running"][0][0] == f"t{RUNNING_KEPT + 499}"  # newest first
    assert taken["failures"] == [failed]
    again = digest.take()  # what happened since: nothing
    assert again["finished"] == 0 and again["durations"] == [] and again["failures"] == []

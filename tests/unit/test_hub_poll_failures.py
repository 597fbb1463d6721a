"""The KV router's hub poll when the hub fails: one traceback per streak of failures, slower retries, the recovery
logged once (a gone hub, as at an app's shutdown, used to log a traceback at every poll)."""

from __future__ import annotations

import asyncio
import logging

from router import serve_router
from router.kv_hub import HubUpdate
from router.serve_router import KvAwareRequestRouter, PollFailures


def test_a_streak_logs_its_traceback_once_and_the_recovery_once(caplog):
    log = logging.getLogger("test.poll_failures")
    failures = PollFailures(log)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        for attempt in range(3):
            try:
                raise ConnectionError(f"hub gone {attempt}")
            except ConnectionError:
                failures.failed(1.0)
        failures.succeeded()
        failures.succeeded()
        try:
            raise ConnectionError("hub gone again")
        except ConnectionError:
            failures.failed(1.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.exc_info[1].args[0] for r in warnings] == ["hub gone 0", "hub gone again"]
    assert "retrying every 1 s" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["KV router: polling the hub works again after 3 failed polls"]
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 2
    assert failures.count == 1


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _FlakyHub:
    """A hub whose first `fail` polls raise, then answers empty updates."""

    def __init__(self, fail: int):
        self.fail, self.calls = fail, 0
        self.events_since = _Remote(self._events_since)

    async def _events_since(self, epoch, cursor):
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("the hub actor is gone")
        return HubUpdate(epoch="e1", cursor=0, events=(), loads=(), snapshot=True)


async def test_the_poller_survives_a_failing_hub_and_resumes(monkeypatch, caplog):
    hub = _FlakyHub(fail=4)
    monkeypatch.setattr(serve_router, "get_or_create_hub", lambda *args: hub)
    router = KvAwareRequestRouter.__new__(KvAwareRequestRouter)  # Serve's own __init__ needs a running deployment
    router.initialize_state(poll_interval_s=0.01)
    router.idle_poll_s = 0.02  # the retry pace (1 s by default), short for the test
    router._deployment_id = type("DeploymentId", (), {"app_name": "app", "name": "decoder"})()
    monkeypatch.setattr(KvAwareRequestRouter, "_replica_id_set", set(), raising=False)
    with caplog.at_level(logging.DEBUG, logger="ray.serve"):
        task = asyncio.get_running_loop().create_task(router._poll_forever())
        try:
            for _ in range(500):  # bounded wait for the recovery: no timing asserted
                if router._epoch == "e1":
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert router._epoch == "e1" and router._poll_failures.count == 0
    ours = [r for r in caplog.records if r.getMessage().startswith("KV router: polling the hub")]
    assert [r.levelno for r in ours] == [logging.WARNING] + [logging.DEBUG] * 3 + [logging.INFO]
    assert ours[0].exc_info is not None and "4 failed polls" in ours[-1].getMessage()

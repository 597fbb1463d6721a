"""The KV router's hub poll: the router only looks the hub up (the decoder replicas create it), quietly while there is
none; when the hub fails, one traceback per streak of failures, slower retries, the recovery logged once (a gone hub,
as at an app's shutdown, used to log a traceback at every poll, and the router created it again)."""

from __future__ import annotations

import asyncio
import logging

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


def _router(monkeypatch, hubs):
    """A router whose hub lookups return `hubs` in turn (then the last one); Serve's own __init__ needs a running
    deployment, so the state is built directly."""
    found = list(hubs)

    def find_hub(app_name: str, deployment: str):
        if (app_name, deployment) != ("poll-test", "decoder"):
            return None  # another router of this process (a Serve handle's, from another test)
        return found.pop(0) if len(found) > 1 else found[0]

    # Patched in the globals the method runs with: in a process where Serve has loaded the router for another test,
    # those are not always the module object that `import router.serve_router` gives.
    monkeypatch.setitem(KvAwareRequestRouter._poll_forever.__globals__, "find_hub", find_hub)
    router = KvAwareRequestRouter.__new__(KvAwareRequestRouter)
    router.initialize_state(poll_interval_s=0.01)
    router.idle_poll_s = 0.02  # the retry pace (1 s by default), short for the test
    router._deployment_id = type("DeploymentId", (), {"app_name": "poll-test", "name": "decoder"})()
    monkeypatch.setattr(KvAwareRequestRouter, "_replica_id_set", set(), raising=False)
    return router


async def _poll_until(router, done) -> None:
    task = asyncio.get_running_loop().create_task(router._poll_forever())
    try:
        for _ in range(500):  # bounded wait: no timing asserted
            if done():
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_poller_survives_a_failing_hub_and_resumes(monkeypatch, caplog):
    hub = _FlakyHub(fail=4)
    router = _router(monkeypatch, [hub])
    with caplog.at_level(logging.DEBUG, logger="ray.serve"):
        await _poll_until(router, lambda: router._epoch == "e1")
    assert router._epoch == "e1" and router._poll_failures.count == 0
    ours = [r for r in caplog.records if r.getMessage().startswith("KV router: polling the hub")]
    assert [r.levelno for r in ours] == [logging.WARNING] + [logging.DEBUG] * 3 + [logging.INFO]
    assert ours[0].exc_info is not None and "4 failed polls" in ours[-1].getMessage()


async def test_no_hub_yet_is_not_a_failure_and_the_router_never_creates_one(monkeypatch, caplog):
    hub = _FlakyHub(fail=0)
    router = _router(monkeypatch, [None, None, None, hub])  # no decoder replica has started the hub yet
    with caplog.at_level(logging.DEBUG, logger="ray.serve"):
        await _poll_until(router, lambda: router._epoch == "e1")
    assert router._epoch == "e1" and hub.calls >= 1
    assert not [r for r in caplog.records if r.getMessage().startswith("KV router: polling the hub")]


def test_the_app_gives_the_configured_hub_log_size_to_the_replicas_that_create_the_hub():
    from cluster.app import _decoder
    from cluster.config import G3ServeConfig
    from router.kv_hub import HubPublisherFactory

    app = _decoder("decoder", G3ServeConfig.model_validate({"router": {"hub_log_size": 1234}}))
    (factory,) = [a for a in app._bound_deployment.init_args if isinstance(a, HubPublisherFactory)]
    assert factory.log_size == 1234
    assert "hub_log_size" not in G3ServeConfig().router.request_router_kwargs()  # the routers only look the hub up

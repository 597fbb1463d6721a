"""`g3serve serve` with `ray.reserved_cpus: 1` on two CPUs: the serving processes on one, the engine on the other.

The CLI runs as a real subprocess (tests/fixtures/cli_serve.py: its own Ray temp dir, a free port, the tiny
multimodal checkpoint). After a streamed completion:
  - every process of its local Ray (GCS, raylet, agents, Serve's controller, HAProxy, the ingress replica) may run
    only on the reserved CPU, and so may the decoder replica's own threads (Serve's loop, the step sender);
  - the decoder replica's step thread and torch's compute threads may run only on the engine's CPU, and computed;
  - the CLI's own thread got its affinity back once Ray was up;
then SIGTERM stops it all.
"""

from __future__ import annotations

import os

import pytest

from tests.fixtures.cli_serve import CliServer, stream_and_reject_through, tiny_cli_config
from tests.fixtures.processes import cmdline, cpu_ticks, still_running, thread_cpus

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")


def test_reserved_cpu_keeps_the_serving_processes_off_the_engines_cpu(tiny_mm_servable_ckpt, tmp_path, ray_tmpdir):
    allowed = sorted(os.sched_getaffinity(0))
    reserved, engine = {allowed[0]}, set(allowed[1:])
    config = tiny_cli_config(tiny_mm_servable_ckpt, reserved_cpus=1)
    # Two compute threads: the step thread and one OpenMP worker, which must inherit the step thread's binding.
    config["engine"]["native"]["num_threads"] = 2
    with CliServer(config, tmp_path, ray_tmpdir) as server:
        server.wait_healthy()
        assert (
            f"CPU layout: ray.reserved_cpus: serving processes on CPUs {sorted(reserved)}, engine on {sorted(engine)}"
            in server.log()
        )
        stream_and_reject_through(server.port)

        tree = server.snapshot_tree()
        decoders = [pid for pid in tree if "ServeReplica:g3serve:decoder" in (cmdline(pid) or "")]
        assert len(decoders) == 1, [(cmdline(p) or "")[:80] for p in tree]
        others = [pid for pid in tree if pid not in decoders]
        assert any("raylet" in (cmdline(p) or "") for p in others) and any(
            "ingress" in (cmdline(p) or "") for p in others
        )
        for pid in others:
            for tid, cpus in thread_cpus(pid).items():
                assert cpus == reserved, f"{(cmdline(pid) or '')[:80]} thread {tid} may run on {cpus}"
        threads = thread_cpus(decoders[0])
        on_engine = [t for t, cpus in threads.items() if cpus == engine]
        assert len(on_engine) >= 2, threads  # the step thread and its OpenMP worker
        assert sum(cpu_ticks(decoders[0], t) for t in on_engine) > 0
        assert all(cpus in (reserved, engine) for cpus in threads.values()), threads
        assert os.sched_getaffinity(server.proc.pid) == set(allowed)  # the CLI's thread, restored after ray.init

        assert server.terminate() == 0, server.log()[-3000:]
        assert still_running(tree) == []

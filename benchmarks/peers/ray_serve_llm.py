"""Ray Serve LLM (`ray.serve.llm`) as its users start it, for benchmarks/serving.py and long_context.py: one
`LLMConfig` with the model and nothing else, `build_openai_app`, `serve.run` on a local Ray.

What a CPU machine forces: Ray Serve LLM's default placement group asks for a GPU per engine worker, so the one
bundle is given as CPUs instead (`placement_group_config`), and Ray gets 2 logical CPUs more than the cores (its
default deployments reserve more CPUs than 2 cores have: its OpenAI ingress replica would wait forever to be
scheduled); everything else is its default. `--engine-kwargs` takes
a JSON object for the extra rows (e.g. '{"dtype": "float32", "enforce_eager": true}' for the fp32-eager row).

    python benchmarks/peers/ray_serve_llm.py --model CKPT_DIR --served-model-name NAME --port P

The process runs until SIGTERM/SIGINT, then shuts Serve and Ray down. The benchmarks wait for /v1/models to answer
(the app has no /health).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (safetensors + config.json)")
    ap.add_argument("--served-model-name", required=True)
    ap.add_argument("--port", type=int, required=True, help="the OpenAI API's port (Serve's HTTP proxy)")
    ap.add_argument("--engine-kwargs", default="{}", help="JSON object passed as LLMConfig.engine_kwargs")
    ap.add_argument(
        "--num-cpus",
        type=int,
        default=(os.cpu_count() or 2) + 2,
        help="Ray's logical CPUs (default: the cores + 2: the engine's bundle and the OpenAI ingress replica each "
        "reserve 1, and with only the cores the ingress never gets scheduled on a 2-core machine)",
    )
    args = ap.parse_args()

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    config = LLMConfig(
        model_loading_config={"model_id": args.served_model_name, "model_source": args.model},
        engine_kwargs=json.loads(args.engine_kwargs),
        placement_group_config={"bundles": [{"CPU": 1}]},  # no GPU here: the engine worker's bundle is a CPU
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

"""`build_app(config)`: the Ray Serve application (ingress -> vision -> decoder), each deployment sized by config.

Each deployment gets its own replicas or autoscaling_config, CPUs and GPUs, so a GPU cluster can run, say, two
ingress replicas on CPU nodes, one vision replica on a small GPU and four decoder replicas on big ones. Access
logs are off: on a 2-core machine, a log line per request is measurable throughput.

The vision deployment exists only when the checkpoint has a vision tower (the 270M is text-only): a text-only
model answers image parts with a 400 from the tokenizer instead of starting an encoder it cannot load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import DeploymentSettings, G3ServeConfig
from cluster.placement import placement_options, validate_for_checkpoint
from cluster.pool_plan import pool_configs, pool_plan
from model_workers.deployment import DecoderDeployment
from model_workers.gemma3.checkpoints import resolve_checkpoint
from router.ingress import G3ServeIngress
from router.kv_hub import HubPublisherFactory
from router.pools import DEFAULT_POOL, pool_deployment_name
from router.serve_router import KvAwareRequestRouter

APP_NAME = "g3serve"
INGRESS, VISION, DECODER = "ingress", "vision", "decoder"

log = logging.getLogger(__name__)


def deployment_options(name: str, settings: DeploymentSettings) -> dict:
    """`serve.deployment(...)` keyword arguments for one deployment."""
    opts: dict = {
        "name": name,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "logging_config": {"enable_access_log": False},
        "graceful_shutdown_timeout_s": 5,
    }
    if settings.autoscaling is not None:
        opts["autoscaling_config"] = settings.autoscaling.to_serve()
    else:
        opts["num_replicas"] = settings.num_replicas
    return opts


def engine_page_size(config: G3ServeConfig) -> int:
    """The KV page size the router must hash with: the engine's own (cluster/contracts/prefix_hash.py is shared)."""
    if config.engine.kind == "vllm":
        return config.engine.vllm.block_size or 16
    return config.engine.native.page_size


def has_vision_tower(checkpoint_dir: Path) -> bool:
    config = json.loads((checkpoint_dir / "config.json").read_text())
    return "vision_config" in config


def decoder_options(name: str, config: G3ServeConfig) -> dict:
    """`serve.deployment(...)` keyword arguments of a decoder deployment: its replicas or autoscaling, and its
    placement (one placement group per replica when the engine has more than one rank: cluster/placement.py)."""
    opts = deployment_options(name, config.decoder)
    opts.update(placement_options(config.decoder, config.engine))
    return opts


def _decoder(name: str, config: G3ServeConfig) -> Application:
    """One decoder deployment (a pool's, or the only one) with its request router."""
    decoder_opts = decoder_options(name, config)
    kv_events = None
    if config.router.enabled:
        kv_events = HubPublisherFactory(period_s=config.router.publish_interval_s, log_size=config.router.hub_log_size)
        router_kwargs = config.router.request_router_kwargs(engine_page_size(config))
        if config.tracing.enabled:
            router_kwargs["tracing"] = config.tracing.model_dump()
        decoder_opts["request_router_config"] = RequestRouterConfig(
            request_router_class=KvAwareRequestRouter, request_router_kwargs=router_kwargs
        )
    elif config.router.fallback == "round_robin":
        from router.baseline_routers import RoundRobinRequestRouter

        decoder_opts["request_router_config"] = RequestRouterConfig(request_router_class=RoundRobinRequestRouter)
    return (
        serve.deployment(DecoderDeployment)
        .options(**decoder_opts)
        .bind(config.decoder_engine(), config.model, kv_events, tracing=config.tracing)
    )


def check_ranks(config: G3ServeConfig, checkpoint: Path) -> None:
    """The TP size against the checkpoint's heads, before anything starts (the config alone cannot know them)."""
    from model_workers.gemma3.config import Gemma3Config

    text = Gemma3Config.from_checkpoint(checkpoint).text
    validate_for_checkpoint(config.engine, text.num_heads, text.num_kv_heads)


def build_app(config: G3ServeConfig) -> Application:
    """The application graph; call from the driver (it resolves the checkpoint once, converting it if needed)."""
    checkpoint = resolve_checkpoint(config.model.checkpoint)
    check_ranks(config, checkpoint)
    if config.router.pools:
        decoders = {name: _decoder(pool_deployment_name(name), cfg) for name, cfg in pool_configs(config).items()}
    else:
        decoders = {DEFAULT_POOL: _decoder(DECODER, config)}
    vision = None
    if has_vision_tower(checkpoint):
        from vision_service.deployment import VisionService

        vision_opts = deployment_options(VISION, config.vision.deployment)
        vision = (
            serve.deployment(VisionService)
            .options(**vision_opts)
            .bind(
                str(checkpoint),
                config.vision.service,
                model_id=config.model.served_model_name,
                tracing=config.tracing,
            )
        )
    ingress_opts = deployment_options(INGRESS, config.ingress.deployment)
    return (
        serve.deployment(G3ServeIngress)
        .options(**ingress_opts)
        .bind(
            config.ingress.settings(),
            config.ingress.resolved_api_keys(),
            config.model.served_model_name,
            config.model.checkpoint,
            config.vision.service,
            pool_plan(config, checkpoint),
            vision,
            decoders,
            tracing=config.tracing,
        )
    )


def run(config: G3ServeConfig, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on the configured host/port and deploy the app; returns the base URL."""
    _restart_serve_if_bound_elsewhere(config.ingress.host, config.ingress.port)
    serve.start(http_options={"host": config.ingress.host, "port": config.ingress.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=blocking)
    return base_url(config)


def _restart_serve_if_bound_elsewhere(host: str, port: int) -> None:
    """Serve fixes its proxy's host/port when it first starts on a Ray cluster, and a later `serve.start` with other
    options is silently ignored: the app would answer on the old port. Shut Serve down first in that case."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve is not running on this cluster yet
        return
    http = ray.get(controller.get_http_config.remote())
    if (http.host, http.port) != (host, port):
        log.warning("Serve's proxy listens on %s:%s; restarting Serve on %s:%s", http.host, http.port, host, port)
        serve.shutdown()


def base_url(config: G3ServeConfig) -> str:
    host = "127.0.0.1" if config.ingress.host in ("0.0.0.0", "::") else config.ingress.host
    return f"http://{host}:{config.ingress.port}"

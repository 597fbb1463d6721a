"""`g3serve deploy render`: Kubernetes manifests (KubeRay RayService + Redis + Service + Ingress) from one preset.

A preset (infra/presets/<name>.yaml) is a `DeployPreset`: the app's own `G3ServeConfig` plus the cluster shape. The
RayService's serveConfigV2 carries that G3ServeConfig verbatim as the application's args, and every pod shape is
derived from it (GPUs per decoder pod = the engine's tensor_parallel_size, decoder pods = replicas per pool), so
the app and the manifests cannot drift: there is one source for both.

Placement, without naming deployments: the decoder replica reserves `tensor_parallel_size` GPUs itself (vLLM's
multiprocessing executor then runs its TP ranks inside that one actor's node: one pod = one replica = one node's
NVLink domain). GPU pods advertise only the CPUs their replica asks for and the head advertises none, so the
CPU-only ingress and router can land only on the CPU group; vision asks for a GPU and its pods are the only ones
with a GPU left.

The output is a kustomize tree: base/ (Redis, the API Service and Ingress) and overlays/gemma3-<preset>/ (the
RayService). tests/unit/test_infra_manifests.py renders every preset and compares it with infra/k8s/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from pydantic import Field

from cluster.config import G3ServeConfig
from cluster.contracts.settings_base import ConfigSection
from cluster.k8s_objects import api_objects, ray_service, redis_objects

REPO = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO / "infra" / "presets"
SERVE_IMPORT_PATH = "cluster.deploy:app_builder"  # Serve calls it with the application's `args` dict


class PodShape(ConfigSection):
    cpu: str = Field("4", description="CPU request and limit of each pod (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit of each pod.")


class CpuGroup(PodShape):
    min_replicas: int = Field(1, ge=0, description="Fewest CPU worker pods (ingress + router).")
    max_replicas: int = Field(4, ge=1, description="Most CPU worker pods.")
    replicas: int = Field(1, ge=0, description="CPU worker pods to start with.")


class GpuGroup(PodShape):
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description='Node labels for GPU pods, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}.',
    )
    shm_size: str = Field("16Gi", description="/dev/shm size (NCCL and vLLM's TP workers exchange tensors there).")


class VisionGroup(GpuGroup):
    replicas: int = Field(1, ge=1, description="Vision pods (one GPU each).")


class RedisSettings(ConfigSection):
    image: str = Field("redis:7.2-alpine", description="Redis image.")
    maxmemory: str = Field("4gb", description="Redis maxmemory; keys are evicted LRU beyond it (allkeys-lru).")
    memory_limit: str = Field("5Gi", description="Pod memory limit (above maxmemory for Redis' own overhead).")
    cpu: str = Field("1", description="Pod CPU.")


class IngressSettings(ConfigSection):
    host: str = Field("g3serve.example.com", description="Host name of the OpenAI API.")
    class_name: str = Field("nginx", description="IngressClass.")
    tls_secret: str | None = Field(None, description="TLS Secret for the host; none = plain HTTP.")


class DeployPreset(ConfigSection):
    name: str = Field(description="Preset name; the overlay is overlays/gemma3-<name>.")
    namespace: str = Field("g3serve", description="Kubernetes namespace.")
    image: str = Field("g3serve:0.1.0-cuda12.8", description="The image built from infra/docker/Dockerfile.")
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay checks compatibility).")
    models_pvc: str = Field("g3serve-models", description="PersistentVolumeClaim holding the checkpoints at /models.")
    app: G3ServeConfig = Field(description="The g3serve config the Serve application runs with.")
    head: PodShape = Field(default_factory=PodShape, description="Ray head pod (runs no replicas).")
    cpu_group: CpuGroup = Field(default_factory=CpuGroup, description="CPU workers: ingress and router.")
    decoder_group: GpuGroup = Field(default_factory=GpuGroup, description="GPU workers: one decoder replica per pod.")
    vision_group: VisionGroup | None = Field(default_factory=VisionGroup, description="GPU workers for vision.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Shared Redis (embedding cache).")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="Kubernetes Ingress.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeployPreset:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    @property
    def tensor_parallel_size(self) -> int:
        return self.app.engine.vllm.tensor_parallel_size if self.app.engine.kind == "vllm" else 1

    def decoder_pools(self) -> list[tuple[str, int]]:
        """(pool name, decoder replicas): the router's pools, or one pool "decoder" from `decoder:`."""
        pools = self.app.router.get("pools") if isinstance(self.app.router, dict) else self.app.router.pools
        if pools:
            return [
                (p["name"], p.get("num_replicas", 1)) if isinstance(p, dict) else (p.name, p.num_replicas)
                for p in pools
            ]
        d = self.app.decoder
        return [("decoder", d.autoscaling.max_replicas if d.autoscaling else d.num_replicas or 1)]


def app_builder(args: dict):
    """The Serve application of a serveConfigV2 / `serve deploy` file: its args are a G3ServeConfig document.

    (Serve converts args to a pydantic model only when the builder's annotation is a class; cluster.app's
    build_app is annotated under `from __future__ import annotations`, i.e. with a string, so we validate here.)"""
    from cluster.app import build_app

    return build_app(G3ServeConfig.model_validate(args))


def load_preset(name: str) -> DeployPreset:
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{name}.yaml"
    return DeployPreset.from_yaml(path)


def serve_config(preset: DeployPreset) -> dict:
    """The Serve config (serveConfigV2): one application whose args are the G3ServeConfig document."""
    app = preset.app
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": app.ingress.port},
        "applications": [
            {
                "name": "g3serve",
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                # Only what the preset sets: the rest are G3ServeConfig's defaults, the same on both sides.
                "args": app.model_dump(mode="json", exclude_unset=True),
            }
        ],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded Serve config) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump_all(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)


def render(preset: DeployPreset) -> dict[str, str]:
    """Relative path -> file text, for base/ and overlays/gemma3-<name>/."""
    overlay = f"overlays/gemma3-{preset.name}"
    rs = ray_service(preset, yaml.safe_dump(serve_config(preset), sort_keys=False, width=120))
    header = f"# Generated by `g3serve deploy render --preset {preset.name}` from infra/presets/{preset.name}.yaml.\n"
    return {
        "base/kustomization.yaml": yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["redis.yaml", "api.yaml"],
            },
            sort_keys=False,
        ),
        "base/redis.yaml": "# Generated by `g3serve deploy render`.\n" + _dump_all(redis_objects(preset)),
        "base/api.yaml": "# Generated by `g3serve deploy render`.\n" + _dump_all(api_objects(preset)),
        f"{overlay}/kustomization.yaml": yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": preset.namespace,
                "resources": ["../../base", "rayservice.yaml"],
            },
            sort_keys=False,
        ),
        f"{overlay}/rayservice.yaml": header + _dump_all([rs]),
    }


def write(files: dict[str, str], out: Path) -> list[Path]:
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    preset = load_preset(args.preset)
    if args.serve_config:  # for `serve deploy` on a cluster made by the Ray cluster launcher (infra/ray/)
        Path(args.serve_config).write_text(yaml.safe_dump(serve_config(preset), sort_keys=False, width=120))
        print(args.serve_config)
        return 0
    for path in write(render(preset), Path(args.out)):
        print(path)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="a name under infra/presets/ (4b-1gpu, 27b-tp8, ...) or a path")
    parser.add_argument("--out", default=str(REPO / "infra" / "k8s"), help="where base/ and overlays/ are written")
    parser.add_argument("--serve-config", help="write only the Serve config (for `serve deploy`) to this file")


def deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """`g3serve deploy render ...`: the CLI's `deploy` subcommand has one action so far, `render` (runs `run`)."""
    sub = parser.add_subparsers(dest="deploy_command", required=True)
    add_arguments(sub.add_parser("render", help="write KubeRay/Kubernetes manifests (or a Serve config) for a preset"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="g3serve deploy render")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

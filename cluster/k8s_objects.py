"""Kubernetes objects (plain dicts, as the API takes them) for `cluster/deploy.py`: RayService, Redis, Service, Ingress.

Kept apart from deploy.py so that the preset model and the object shapes each stay one concept; the shapes are
checked against the Kubernetes v1.32 and KubeRay v1.7 schemas in infra/schemas/ by the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.local_ray import HAPROXY_MODE_ENV

if TYPE_CHECKING:
    from cluster.deploy_preset import DeployPreset, GpuGroup, PodShape

APP_LABELS = {"app.kubernetes.io/name": "g3serve", "app.kubernetes.io/part-of": "g3serve"}
REDIS_NAME = "g3serve-redis"
REDIS_SECRET = "g3serve-redis"  # key `password`; replace the placeholder before deploying (see infra/README.md)
API_PORT = 8000
RAY_METRICS_PORT = 8080


def _resources(shape: PodShape, gpus: int = 0) -> dict:
    amounts = {"cpu": shape.cpu, "memory": shape.memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _redis_env() -> list[dict]:
    # $(REDIS_PASSWORD) is expanded by the kubelet, so the password lives only in the Secret.
    return [
        {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "password"}}},
        {"name": "G3SERVE_REDIS_URL", "value": f"redis://:$(REDIS_PASSWORD)@{REDIS_NAME}:6379/0"},
    ]


def _http_proxy_env(preset: DeployPreset) -> list[dict]:
    # Serve reads its front door from every Ray process's environment (cluster/local_ray.py): ray.http_proxy
    # 'auto' or 'haproxy' runs Ray Serve's HAProxy mode (the image's ray[serve] ships the binary), 'serve' its proxy.
    if preset.app.ray.http_proxy == "serve":
        return []
    return [{"name": HAPROXY_MODE_ENV, "value": "1"}]


def _ray_container(preset: DeployPreset, shape: PodShape, gpus: int = 0, head: bool = False) -> dict:
    ports = [{"name": "metrics", "containerPort": RAY_METRICS_PORT}, {"name": "serve", "containerPort": API_PORT}]
    if head:
        ports = [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            *ports,
        ]
    container = {
        "name": "ray-head" if head else "ray-worker",
        "image": preset.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "resources": _resources(shape, gpus),
        "env": [*_redis_env(), {"name": "RAY_AUTH_MODE", "value": "disabled"}, *_http_proxy_env(preset)],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    }
    if gpus:
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    return container


def _pod_template(preset: DeployPreset, shape: PodShape, gpus: int = 0, head: bool = False) -> dict:
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": preset.models_pvc, "readOnly": True}}]
    spec: dict = {"containers": [_ray_container(preset, shape, gpus, head)], "volumes": volumes}
    if gpus:
        gpu_shape: GpuGroup = shape  # type: ignore[assignment]
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gpu_shape.shm_size}})
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if gpu_shape.node_selector:
            spec["nodeSelector"] = dict(gpu_shape.node_selector)
    return {"metadata": {"labels": dict(APP_LABELS)}, "spec": spec}


def _num_cpus(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def ray_service(preset: DeployPreset, serve_config_yaml: str) -> dict:
    app = preset.app
    node = preset.decoder_node()
    workers = [
        {
            "groupName": "cpu",
            "replicas": preset.cpu_group.replicas,
            "minReplicas": preset.cpu_group.min_replicas,
            "maxReplicas": preset.cpu_group.max_replicas,
            "rayStartParams": {"metrics-export-port": str(RAY_METRICS_PORT)},
            "template": _pod_template(preset, preset.cpu_group),
        }
    ]
    # One pod per decoder replica (per pipeline stage when the placement strategy spans nodes): the pod offers
    # exactly what the replica's placement-group bundles on it ask for (the replica actor's CPUs + its ranks' GPUs,
    # or CPUs on CPU ranks), so nothing else fits there.
    for pool, replicas in preset.decoder_pods():
        group = "decoder" if pool == "decoder" else f"decoder-{pool}"
        workers.append(
            {
                "groupName": group,
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": replicas,
                "rayStartParams": {
                    "num-cpus": _num_cpus(node.cpus),
                    "num-gpus": str(node.gpus),
                    "metrics-export-port": str(RAY_METRICS_PORT),
                },
                "template": _pod_template(preset, preset.decoder_group, gpus=node.gpus),
            }
        )
    if preset.vision_group is not None:
        v = preset.vision_group
        workers.append(
            {
                "groupName": "vision",
                "replicas": v.replicas,
                "minReplicas": v.replicas,
                "maxReplicas": v.replicas,
                "rayStartParams": {
                    "num-cpus": _num_cpus(app.vision.deployment.num_cpus),
                    "num-gpus": "1",
                    "metrics-export-port": str(RAY_METRICS_PORT),
                },
                "template": _pod_template(preset, v, gpus=1),
            }
        )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "g3serve", "labels": dict(APP_LABELS)},
        "spec": {
            "serveConfigV2": serve_config_yaml,
            "rayClusterConfig": {
                "rayVersion": preset.ray_version,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    # num-cpus 0: no Serve replica on the head, so losing a worker never takes the GCS with it.
                    "rayStartParams": {
                        "num-cpus": "0",
                        "dashboard-host": "0.0.0.0",
                        "metrics-export-port": str(RAY_METRICS_PORT),
                    },
                    "template": _pod_template(preset, preset.head, head=True),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


def redis_objects(preset: DeployPreset) -> list[dict]:
    r = preset.redis
    labels = {"app.kubernetes.io/name": REDIS_NAME, "app.kubernetes.io/part-of": "g3serve"}
    args = [
        "--requirepass",
        "$(REDIS_PASSWORD)",
        "--maxmemory",
        r.maxmemory,
        "--maxmemory-policy",
        "allkeys-lru",  # a cache: evict any key, least recently used first, instead of refusing writes
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    probe = {"exec": {"command": ["sh", "-c", 'redis-cli -a "$REDIS_PASSWORD" --no-auth-warning ping']}}
    container = {
        "name": "redis",
        "image": r.image,
        "command": ["redis-server"],
        "args": args,
        "env": [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "password"}}}],
        "ports": [{"name": "redis", "containerPort": 6379}],
        "resources": {
            "requests": {"cpu": r.cpu, "memory": r.memory_limit},
            "limits": {"cpu": r.cpu, "memory": r.memory_limit},
        },
        "readinessProbe": {**probe, "periodSeconds": 5},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": REDIS_SECRET, "labels": labels},
            "type": "Opaque",
            "stringData": {"password": "change-me-before-deploying"},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": REDIS_NAME, "labels": labels},
            "spec": {
                "serviceName": REDIS_NAME,
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": REDIS_NAME, "labels": labels},
            "spec": {"selector": labels, "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]},
        },
    ]


def api_objects(preset: DeployPreset) -> list[dict]:
    # Every Ray pod runs a Serve proxy (proxy_location EveryNode); KubeRay labels the ready ones ray.io/serve=true.
    selector = {"app.kubernetes.io/name": "g3serve", "ray.io/serve": "true"}
    ing = preset.ingress
    spec: dict = {
        "ingressClassName": ing.class_name,
        "rules": [
            {
                "host": ing.host,
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": "g3serve-api", "port": {"name": "http"}}},
                        }
                    ]
                },
            }
        ],
    }
    if ing.tls_secret:
        spec["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret}]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "g3serve-api", "labels": dict(APP_LABELS)},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": API_PORT}]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {
                "name": "g3serve-api",
                "labels": dict(APP_LABELS),
                # Streams (SSE) and 128K-token prompts: no proxy buffering, long reads, large bodies.
                "annotations": {
                    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                    "nginx.ingress.kubernetes.io/proxy-read-timeout": "600",
                    "nginx.ingress.kubernetes.io/proxy-body-size": "64m",
                },
            },
            "spec": spec,
        },
    ]

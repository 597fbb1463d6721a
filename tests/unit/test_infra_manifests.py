"""infra/k8s: rendered from the presets (no drift), valid against the Kubernetes and KubeRay schemas kept in
infra/schemas/, and the Serve config inside the RayService parses with Ray's and our own config models."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.app import decoder_options
from cluster.config import G3ServeConfig
from cluster.deploy import PRESETS_DIR, load_preset, render
from cluster.deploy_preset import DeployPreset

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
SCHEMAS = REPO / "infra" / "schemas"
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
SCHEMA_FILES = {
    ("apps/v1", "Deployment"): "kubernetes-v1.32.0/deployment-apps-v1.json",
    ("apps/v1", "StatefulSet"): "kubernetes-v1.32.0/statefulset-apps-v1.json",
    ("v1", "Service"): "kubernetes-v1.32.0/service-v1.json",
    ("v1", "Secret"): "kubernetes-v1.32.0/secret-v1.json",
    ("v1", "ConfigMap"): "kubernetes-v1.32.0/configmap-v1.json",
    ("networking.k8s.io/v1", "Ingress"): "kubernetes-v1.32.0/ingress-networking-v1.json",
    ("ray.io/v1", "RayService"): "kuberay-v1.7.0/rayservice-ray.io-v1.json",
}


def _strict(node):
    """CRD schemas only prune unknown fields on the server; reject them here so a typo fails the test."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@cache
def _validator(api_version: str, kind: str):
    schema = json.loads((SCHEMAS / SCHEMA_FILES[(api_version, kind)]).read_text())
    if api_version == "ray.io/v1":
        schema = _strict(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def _validate(doc: dict) -> None:
    errors = sorted(_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{doc['kind']} {list(e.path)}: {e.message}" for e in errors[:5])


def _manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("preset", PRESETS)
def test_committed_manifests_are_what_the_renderer_writes(preset):
    for rel, text in render(load_preset(preset)).items():
        assert (K8S / rel).read_text() == text, f"infra/k8s/{rel} is stale: run g3serve deploy render --preset {preset}"


def test_the_three_overlays_exist():
    assert {p.name for p in (K8S / "overlays").iterdir()} >= {"gemma3-4b-1gpu", "gemma3-27b-tp8", "gemma3-27b-tp8-long"}


def test_every_manifest_validates_against_its_schema():
    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"RayService", "StatefulSet", "Service", "Secret", "Ingress"}
    for path, doc in docs:
        assert (doc["apiVersion"], doc["kind"]) in SCHEMA_FILES, f"{path}: no schema kept for {doc['kind']}"
        _validate(doc)


def test_the_validator_rejects_a_typo():
    rs = next(d for _, d in _manifests() if d["kind"] == "RayService")
    bad = copy.deepcopy(rs)
    group = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["replica"] = group.pop("replicas")
    with pytest.raises(AssertionError, match="replica"):
        _validate(bad)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = {"limit": {}}
    with pytest.raises(AssertionError):
        _validate(bad)


def _ray_service(preset: str) -> dict:
    path = K8S / "overlays" / f"gemma3-{preset}" / "rayservice.yaml"
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_serve_config_parses_with_ray_and_our_config(preset):
    serve = yaml.safe_load(_ray_service(preset)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # what KubeRay hands to Serve's REST API
    (app,) = serve["applications"]
    parsed = G3ServeConfig.model_validate(app["args"])
    assert parsed == load_preset(preset).app


@pytest.mark.parametrize("preset", PRESETS)
def test_pod_shapes_follow_the_config(preset):
    p = load_preset(preset)
    opts = decoder_options("decoder", p.app)
    ranks = p.app.engine.vllm.tensor_parallel_size * p.app.engine.vllm.pipeline_parallel_size
    if ranks == 1:  # one GPU: the replica actor reserves it, no placement group
        assert "placement_group_bundles" not in opts and opts["ray_actor_options"]["num_gpus"] == p.app.decoder.num_gpus
        bundles, nodes = [{"CPU": p.app.decoder.num_cpus}], 1
        ranks = int(p.app.decoder.num_gpus)
    else:  # the replica's own CPUs, then one GPU bundle per rank; the actor reserves no GPU
        bundles = opts["placement_group_bundles"]
        assert opts["ray_actor_options"]["num_gpus"] == 0 and bundles[0] == {"CPU": p.app.decoder.num_cpus}
        assert bundles[1:] == [{"GPU": 1}] * ranks
        nodes = p.app.engine.vllm.pipeline_parallel_size if opts["placement_group_strategy"] != "STRICT_PACK" else 1
    groups = {g["groupName"]: g for g in _ray_service(preset)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    decoders = {name: g for name, g in groups.items() if name.startswith("decoder")}
    assert decoders and "cpu" in groups and "vision" in groups
    for g in decoders.values():  # the pods of one replica together offer exactly its bundles
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == g["rayStartParams"]["num-gpus"] == str(ranks // nodes)
        assert float(g["rayStartParams"]["num-cpus"]) == bundles[0]["CPU"]
    replicas = sum(n for _, n in p.decoder_pools())
    assert sum(g["replicas"] for g in decoders.values()) == replicas * nodes


@pytest.mark.parametrize("http_proxy", ["auto", "serve"])
def test_every_ray_pod_gets_the_configs_http_front_door(http_proxy):
    from cluster.k8s_objects import ray_service

    p = load_preset(PRESETS[0])
    p = p.model_copy(
        update={"app": p.app.model_copy(update={"ray": p.app.ray.model_copy(update={"http_proxy": http_proxy})})}
    )
    spec = ray_service(p, "applications: []")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == ("1" if http_proxy == "auto" else None)


def test_long_context_overlay_has_two_pools():
    groups = _ray_service("27b-tp8-long")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "decoder-short", "decoder-long", "vision"}
    router = load_preset("27b-tp8-long").app.model_dump()["router"]
    pools = {p["name"]: p["max_context"] for p in router["pools"]}
    assert pools == {"short": 32768, "long": 131072}


def test_redis_has_auth_and_lru_eviction():
    docs = [d for _, d in _manifests()]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (env,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert env["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_preset_rejects_unknown_keys(tmp_path):
    raw = yaml.safe_load((PRESETS_DIR / "27b-tp8.yaml").read_text())
    raw["app"]["decoder"]["num_gpu"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="num_gpu"):
        DeployPreset.from_yaml(path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", ["gemma3-4b-1gpu", "gemma3-27b-tp8", "gemma3-27b-tp8-long"])
def test_kustomize_build_output_validates(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["metadata"].get("namespace") for d in docs} == {"g3serve"}
    for doc in docs:
        _validate(doc)


@pytest.mark.parametrize("preset", PRESETS)
def test_serve_import_path_builds_the_app_from_the_args(preset, tiny_mm_ckpt):
    # What Serve does with the serveConfigV2 application: import the builder, call it with `args`. Binding the
    # deployment graph needs no running Ray; a tiny checkpoint stands in for /models/... on the pods.
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    (app,) = yaml.safe_load(_ray_service(preset)["spec"]["serveConfigV2"])["applications"]
    app["args"]["model"]["checkpoint"] = str(tiny_mm_ckpt)
    builder = import_attr(app["import_path"])
    vllm = app["args"]["engine"]["vllm"]
    if 4 % vllm.get("tensor_parallel_size", 1):
        # The tiny checkpoint has 4 attention heads: the preset's TP size is refused at app build, naming the field.
        with pytest.raises(ValueError, match=r"engine\.vllm\.tensor_parallel_size \(\d+\) must divide the model's 4"):
            call_user_app_builder_with_args_if_necessary(builder, copy.deepcopy(app["args"]))
        vllm.update(tensor_parallel_size=1, pipeline_parallel_size=1)  # the 4-head stand-in with one rank
    built = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    assert isinstance(built, Application)

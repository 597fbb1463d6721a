"""The YAML config: defaults round-trip, typos and contradictions are refused with a message."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from cluster.config import G3ServeConfig
from router.ingress_settings import API_KEYS_ENV, IngressSettings


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = G3ServeConfig()
    path = tmp_path / "g3serve.yaml"
    path.write_text(cfg.to_yaml())
    assert G3ServeConfig.from_yaml(path) == cfg


def test_partial_yaml_keeps_other_defaults(tmp_path):
    path = tmp_path / "g3serve.yaml"
    path.write_text("engine:\n  native:\n    page_size: 32\ningress:\n  port: 9001\n")
    cfg = G3ServeConfig.from_yaml(path)
    assert cfg.engine.native.page_size == 32
    assert cfg.ingress.port == 9001
    assert cfg.engine.native.max_num_seqs == G3ServeConfig().engine.native.max_num_seqs


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "g3serve.yaml"
    path.write_text("ingress:\n  prot: 9001\n")
    with pytest.raises(ValidationError, match="prot"):
        G3ServeConfig.from_yaml(path)


def test_float16_is_refused():
    with pytest.raises(ValidationError, match="dtype"):
        G3ServeConfig.model_validate({"model": {"dtype": "float16"}})


def test_autoscaling_bounds_checked():
    with pytest.raises(ValidationError, match="min_replicas"):
        G3ServeConfig.model_validate({"decoder": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_non_mapping_yaml_is_refused(tmp_path):
    path = tmp_path / "g3serve.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        G3ServeConfig.from_yaml(path)


def test_api_keys_merge_config_and_env(monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, " k2 , k3,,k1")
    assert IngressSettings(api_keys=["k1"]).resolved_api_keys() == ("k1", "k2", "k3")
    monkeypatch.delenv(API_KEYS_ENV)
    assert IngressSettings().resolved_api_keys() == ()


def test_native_engine_config_gets_model_fields():
    cfg = G3ServeConfig.model_validate({"model": {"max_model_len": 2048, "dtype": "bfloat16"}})
    native = cfg.native_engine_config("/ckpt")
    assert (native.checkpoint, native.max_model_len, native.dtype) == ("/ckpt", 2048, "bfloat16")
    assert native.served_model_name == cfg.model.served_model_name
    # The default is auto (resolved on the replica's hardware at load, model_workers/native/precision.py), and
    # fp32-exact is one setting away.
    assert G3ServeConfig().native_engine_config("/c").dtype == "auto"
    fp32 = G3ServeConfig.model_validate({"model": {"dtype": "float32"}})
    assert fp32.native_engine_config("/c").dtype == "float32"


def _walk(model: type[BaseModel], path: str = ""):
    for name, field in model.model_fields.items():
        yield f"{path}{name}", field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, f"{path}{name}.")


def test_native_threads_default_to_the_node_for_one_replica_else_to_the_reservation():
    one = G3ServeConfig().native_engine_config("/ckpt")
    assert one.num_threads is None  # the engine takes every core its process may use (available_cores)
    shared = G3ServeConfig.model_validate({"decoder": {"num_replicas": 3, "num_cpus": 1.5}})
    assert shared.native_engine_config("/ckpt").num_threads == 2
    scaled = G3ServeConfig.model_validate(
        {"decoder": {"num_cpus": 4, "autoscaling": {"min_replicas": 1, "max_replicas": 4}}}
    )
    assert scaled.native_engine_config("/ckpt").num_threads == 4
    pinned = G3ServeConfig.model_validate({"decoder": {"num_replicas": 3}, "engine": {"native": {"num_threads": 7}}})
    assert pinned.native_engine_config("/ckpt").num_threads == 7


def test_every_field_is_described():
    missing = [p for p, f in _walk(G3ServeConfig) if not f.description]
    assert missing == []


def test_commented_defaults_parse_back_to_the_defaults(tmp_path):
    from cluster.config_doc import commented_yaml, markdown_reference

    text = commented_yaml()
    assert "# Tokens per KV page" in text
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    assert G3ServeConfig.from_yaml(path) == G3ServeConfig()
    assert "| `engine.native.page_size` | `16` |" in markdown_reference()


def test_readme_config_reference_is_current():
    from pathlib import Path

    from cluster.config_doc import markdown_reference

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    section = readme[readme.index(start) + len(start) : readme.index(end)]
    assert section == markdown_reference(), (
        "README config reference is stale: regenerate with g3serve config --reference"
    )

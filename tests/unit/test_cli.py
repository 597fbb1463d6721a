"""The g3serve CLI's offline subcommands (no Ray, no HTTP)."""

from __future__ import annotations

from cluster.cli import SUBCOMMANDS, build_parser, main
from cluster.config import G3ServeConfig


def test_config_defaults_prints_commented_yaml(capsys, tmp_path):
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# The served model.")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert G3ServeConfig.from_yaml(path) == G3ServeConfig()


def test_config_check_reports_bad_files(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingress:\n  port: -1\n")
    assert main(["config", "--check", str(path)]) == 1
    assert "port" in capsys.readouterr().err


def test_every_subcommand_is_registered_with_help():
    parser = build_parser()
    names = {c.name for c in SUBCOMMANDS}
    assert {"serve", "chat", "status", "config"} <= names
    assert parser.parse_args(["chat", "hi", "--image", "a.png"]).image == ["a.png"]

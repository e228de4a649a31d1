"""Process set-up for jaxgen's command-line entry points: XLA host devices and the compilation cache."""

from __future__ import annotations

import os


def configure_host_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices; has effect only before JAX initialises its backends."""
    if count > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk, so a resumed or repeated command skips most compilation.

    JAX_COMPILATION_CACHE_DIR, when set, chooses the folder; otherwise ~/.cache/jaxgen/xla is used.
    """
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxgen/xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

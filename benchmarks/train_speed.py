"""Measure training speed and peak memory of a config's train step, for 1 and 2 XLA host devices.

Each device count runs in its own process (XLA_FLAGS must be set before JAX starts). A run compiles the
step, runs warm-up steps, then times `--steps` steps and reports steps/s, images/s and peak memory: the
process's maximum resident set size on CPU, and the device allocator's peak where the backend reports it.

  python -m benchmarks.train_speed --cfg ddpm_digits --out benchmarks/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="ddpm_digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--devices", default="1,2", help="comma-separated XLA host device counts to compare")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    parser.add_argument("--out", default="benchmarks/results/train_speed.json")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Time the train step in this process, with the device count XLA was started with."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen import config as config_lib
    from jaxgen import tasks, trainer
    from jaxgen.data import BatchLoader

    config = config_lib.load_config(args.cfg, [*args.overrides, f"train.host_devices={args.worker}"])
    train_data, held_out = trainer.load_data(config)
    task = tasks.make_task(config, held_out)
    model = trainer.create_model(task, 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = trainer.make_mesh(args.worker)
    tx = trainer.make_optimizer(config.optim, config.train.num_steps)
    state = trainer.TrainState(step=jnp.int32(0), params=params, ema_params=jax.tree.map(jnp.copy, params),
                               opt_state=tx.init(params))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    step_fn = jax.jit(trainer.make_train_step(task, graphdef, tx, 0.999), donate_argnums=0)
    loader = BatchLoader(train_data, config.data.batch_size, seed=0)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batches = [{k: jax.device_put(v, sharding) for k, v in next(loader).items()} for _ in range(8)]
    key = jax.random.PRNGKey(0)

    started = time.perf_counter()
    state, out = step_fn(state, rest, batches[0], key)
    jax.block_until_ready(out)
    compile_seconds = time.perf_counter() - started
    for i in range(args.warmup):
        state, out = step_fn(state, rest, batches[i % 8], jax.random.fold_in(key, i))
    jax.block_until_ready(out)
    started = time.perf_counter()
    for i in range(args.steps):
        state, out = step_fn(state, rest, batches[i % 8], jax.random.fold_in(key, i))
    jax.block_until_ready(out)
    seconds = time.perf_counter() - started
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "host_devices": mesh.size,
        "batch_size": config.data.batch_size,
        "parameters": tasks.model_summary(model)["parameters"],
        "compile_seconds": compile_seconds,
        "steps_per_s": args.steps / seconds,
        "images_per_s": args.steps * config.data.batch_size / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(args)))
        return 0
    rows = []
    for count in [int(c) for c in args.devices.split(",")]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        command = [sys.executable, "-m", "benchmarks.train_speed", "--cfg", args.cfg, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--worker", str(count)]
        for override in args.overrides:
            command += ["--set", override]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"measured {count} host device(s): {rows[-1]['steps_per_s']:.2f} steps/s", flush=True)
    base = rows[0]["steps_per_s"]
    print(f"\n{args.cfg}: {rows[0]['parameters']:,} parameters, batch {rows[0]['batch_size']}, "
          f"{platform.machine()} with {os.cpu_count()} CPUs")
    print("| host devices | compile s | steps/s | images/s | speed-up | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['host_devices']} | {row['compile_seconds']:.1f} | {row['steps_per_s']:.2f} | "
              f"{row['images_per_s']:.0f} | {row['steps_per_s'] / base:.2f}x | {row['peak_rss_mib']:.0f} |")
    result = {"command": "python -m benchmarks.train_speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": args.cfg, "cpus": os.cpu_count(), "machine": platform.machine(), "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

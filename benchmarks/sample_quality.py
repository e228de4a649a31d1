"""Score samples of the digits diffusion model with every sampler and guidance setting.

For each setting, draws the same number of samples per class, then measures with the digit classifier
trained on real digits (configs/digit_classifier.py):
- conditional accuracy: the fraction of samples classified as the label they were drawn for;
- Fréchet distance between the classifier features of held-out real digits and of the samples.
The floor row is real-vs-real: the same number of training digits against the held-out digits.

Guidance scale s follows out_uncond + s * (out_cond - out_uncond): 0 is the unconditional model, 1 the
conditional model without guidance, 3 guided. The "classifier" rows use the unconditional model (s = 0)
steered by the noise-aware classifier (configs/noisy_classifier_digits.py) with --classifier-scale.

Run after training the three models (`make demo` does):
  python -m benchmarks.sample_quality --out benchmarks/results/sample_quality.json \
      --markdown benchmarks/results/sample_quality.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

PRESETS = {
    # name: list of (label, sampler, steps) and the guidance settings.
    "full": {
        "samplers": [("DDPM-1000", "ddpm", 1000), ("DDIM-50", "ddim", 50), ("DDIM-20", "ddim", 20),
                     ("DPM-Solver++-20", "dpmpp_2m", 20)],
        "guidance": ["0", "1", "3", "classifier"],
    },
    "demo": {
        "samplers": [("DDIM-50", "ddim", 50), ("DPM-Solver++-20", "dpmpp_2m", 20)],
        "guidance": ["1", "3"],
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/ddpm_digits", help="diffusion run folder")
    parser.add_argument("--scorer", default="runs/digit_classifier", help="digit classifier run folder")
    parser.add_argument("--classifier", default="runs/noisy_classifier_digits",
                        help="noise-aware classifier run folder, for the classifier-guidance rows")
    parser.add_argument("--classifier-scale", type=float, default=10.0,
                        help="classifier guidance scale for the classifier rows")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--samplers", default=None,
                        help="comma-separated sampler rows to keep from the preset, e.g. DDIM-50,DDIM-20")
    parser.add_argument("--guidance", default=None,
                        help="comma-separated guidance settings replacing the preset's, e.g. 1,3,classifier")
    parser.add_argument("--per-class", type=int, default=30, help="samples drawn per class for each setting")
    parser.add_argument("--batch", type=int, default=300, help="samples per jitted call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-devices", type=int, default=2, help="XLA CPU devices to split each batch over")
    parser.add_argument("--out", default="benchmarks/results/sample_quality.json", help="JSON output path")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this path")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxgen.runtime import configure_host_devices

    # XLA runs convolutions on one thread per CPU device, so the batch is split over two host devices.
    configure_host_devices(args.host_devices)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgen import checkpoint, metrics, sampling, trainer
    from jaxgen.config import SampleConfig
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.runtime import enable_compilation_cache

    enable_compilation_cache()

    config = checkpoint.read_run_config(args.run, expected_task="diffusion")
    scorer_config = checkpoint.read_run_config(args.scorer, expected_task="classifier")
    graphdef, params, rest, step = trainer.build_inference_model(config, args.run)
    s_graphdef, s_params, s_rest, _ = trainer.build_inference_model(scorer_config, args.scorer)
    scorer = nnx.merge(s_graphdef, s_params, s_rest)
    score_logits = jax.jit(lambda x: scorer(x))
    score_features = jax.jit(lambda x: scorer.features(x))
    preset = dict(PRESETS[args.preset])
    if args.samplers:
        wanted = args.samplers.split(",")
        preset["samplers"] = [row for row in PRESETS["full"]["samplers"] if row[0] in wanted]
        if len(preset["samplers"]) != len(wanted):
            known = [row[0] for row in PRESETS["full"]["samplers"]]
            raise SystemExit(f"error: --samplers {args.samplers!r} names a sampler outside {known}")
    if args.guidance:
        preset["guidance"] = args.guidance.split(",")
    classifier = None
    if "classifier" in preset["guidance"]:
        c_config = checkpoint.read_run_config(args.classifier, expected_task="noisy_classifier")
        sampling.check_classifier_matches(config, c_config)
        classifier = trainer.build_inference_model(c_config, args.classifier)

    train_data, held_out = trainer.load_data(config)
    num_classes = config.model.num_class_embeds - 1
    real_features = np.asarray(score_features(jnp.asarray(held_out["image"])))
    rng = np.random.default_rng(args.seed)
    floor_idx = rng.choice(len(train_data["image"]), size=len(held_out["image"]), replace=False)
    floor_features = np.asarray(score_features(jnp.asarray(train_data["image"][floor_idx])))
    floor = metrics.frechet_distance_from_features(floor_features, real_features)
    held_out_accuracy = metrics.conditional_accuracy(np.asarray(score_logits(jnp.asarray(held_out["image"]))),
                                                     held_out["label"])

    schedule = sampling.schedule_from_config(config)
    size = config.data.image_size
    mesh = trainer.make_mesh(args.host_devices)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    if classifier is not None:
        classifier = (classifier[0], jax.device_put(classifier[1], replicated), classifier[2], classifier[3])
    if args.batch % mesh.size:
        raise SystemExit(f"error: --batch {args.batch} does not split over {mesh.size} devices")
    labels_all = np.tile(np.arange(num_classes, dtype=np.int32), args.per_class)
    rows = []
    for label, sampler, steps in preset["samplers"]:
        sample_config = SampleConfig(sampler=sampler, num_steps=steps)
        common = dict(image_shape=(size, size, 1), prediction_type=config.diffusion.prediction_type,
                      null_label=num_classes, batch_sharding=batch_sharding)
        # Scales 0 and 1 need one model call per step (null labels or real labels); other scales need two.
        single_fn = sampling.make_sample_fn(graphdef, rest, schedule, sample_config, classifier_free=False,
                                            **common)
        cfg_fn = sampling.make_sample_fn(graphdef, rest, schedule, sample_config, **common)
        for setting in preset["guidance"]:
            extra, use_null = (), False
            if setting == "classifier":
                fn = sampling.make_sample_fn(graphdef, rest, schedule, sample_config, classifier_free=False,
                                             classifier=(classifier[0], classifier[2]), **common)
                extra, use_null = (classifier[1], jnp.float32(args.classifier_scale)), True
            elif float(setting) in (0.0, 1.0):
                fn, use_null = single_fn, float(setting) == 0.0
            else:
                fn = cfg_fn
            scale = 0.0 if setting == "classifier" else float(setting)
            started = time.perf_counter()
            samples = []
            for i in range(0, len(labels_all), args.batch):
                labels = jax.device_put(labels_all[i:i + args.batch], batch_sharding)
                model_labels = jnp.full_like(labels, num_classes) if use_null else labels
                key = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(args.seed), i), replicated)
                if setting == "classifier":
                    # The unconditional model receives the null class; the classifier steers towards `labels`.
                    samples.append(np.asarray(fn(params, key, labels, jnp.float32(scale), *extra,
                                                 model_labels=model_labels)))
                else:
                    samples.append(np.asarray(fn(params, key, model_labels, jnp.float32(scale))))
            samples = np.concatenate(samples)
            seconds = time.perf_counter() - started
            accuracy = metrics.conditional_accuracy(np.asarray(score_logits(jnp.asarray(samples))), labels_all)
            distance = metrics.frechet_distance_from_features(np.asarray(score_features(jnp.asarray(samples))),
                                                              real_features)
            guidance_label = (f"classifier {args.classifier_scale:g}" if setting == "classifier" else setting)
            row = {"sampler": label, "steps": steps, "guidance": guidance_label, "accuracy": accuracy,
                   "frechet_distance": distance, "samples": len(labels_all), "seconds": seconds}
            rows.append(row)
            print(f"{label:>16}  guidance {guidance_label:>12}  accuracy {accuracy:6.3f}  "
                  f"FD {distance:8.3f}  ({seconds:.0f} s)", flush=True)

    result = {
        "command": "python -m benchmarks.sample_quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "diffusion_run": args.run, "checkpoint_step": step, "per_class": args.per_class,
        "held_out_real": len(held_out["image"]), "scorer_held_out_accuracy": held_out_accuracy,
        "real_vs_real_frechet_distance": floor, "machine": f"{platform.machine()}, {jax.devices()[0].platform}",
        "jax": jax.__version__, "rows": rows,
    }
    table = format_table(result)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table + "\n")
        print(f"wrote {args.markdown}")
    return 0


def format_table(result: dict) -> str:
    """Render the result rows as a Markdown table with the real-vs-real floor."""
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Checkpoint step {result['checkpoint_step']}; {result['per_class']} samples per class per row; "
        f"scorer accuracy on held-out real digits {result['scorer_held_out_accuracy']:.3f}; "
        f"Fréchet distance floor (real train vs real held-out, {result['held_out_real']} each) "
        f"{result['real_vs_real_frechet_distance']:.3f}.",
        "",
        "| sampler | guidance | conditional accuracy | Fréchet distance | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['sampler']} | {row['guidance']} | {row['accuracy']:.3f} | "
                     f"{row['frechet_distance']:.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

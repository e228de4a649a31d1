"""Train a model from a config file: `python -m jaxgen.train --cfg ddpm_digits [--set key=value ...]`.

A bare config name is looked up in `configs/`, and `--cfg FILE:ARG` passes ARG to the file's get_config
(`--cfg opensora.py:v1.2`). Rerunning the same command resumes from the newest checkpoint in the run folder
(`train.workdir`). A multi-stage task such as `opensora` trains its stages in order, each in its own folder
under `train.workdir`; a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxgen import config as config_lib
from jaxgen.runtime import configure_host_devices, enable_compilation_cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of `jaxgen.train`."""
    parser = argparse.ArgumentParser(prog="python -m jaxgen.train", description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="config file, or the name of a file in configs/")
    parser.add_argument("--cfg-arg", default=None, help="argument passed to the config's get_config(arg)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.learning_rate=3e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `jaxgen.train` and return the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax and TFDS log every file operation at INFO through absl; keep their warnings and errors only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        config = config_lib.load_config(args.cfg, args.overrides, arg=args.cfg_arg)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print("\n".join(config_lib.describe(config)))
        return 0
    from jaxgen import tasks  # importing JAX is fine here; its devices start on first use

    try:
        stages = tasks.stage_configs(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_host_devices(max(stage.train.host_devices for stage in stages))

    from jaxgen import checkpoint, trainer  # imported here so that XLA_FLAGS is set before JAX starts

    enable_compilation_cache()

    try:
        for index, stage in enumerate(stages):
            if len(stages) > 1:
                logging.getLogger("jaxgen.train").info("stage %d of %d: task %s in %s", index + 1, len(stages),
                                                       stage.task, stage.train.workdir)
            trainer.train(stage)
    except (trainer.NonFiniteLossError, checkpoint.RunFolderError) as error:
        logging.getLogger("jaxgen.train").error("%s", error)
        return 1
    except (ValueError, FileNotFoundError) as error:
        # Config values that only the task, model or data set can check, e.g. an unknown sampler name or a
        # data or pipeline folder that does not exist.
        logging.getLogger("jaxgen.train").error("invalid config: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

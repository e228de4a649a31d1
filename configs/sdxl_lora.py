"""LoRA fine-tuning of an SDXL U-Net on a folder of captioned images.

Train:   python -m jaxgen.train --cfg sdxl_lora
Resume:  rerun the same command; it continues from the newest checkpoint in runs/sdxl_lora.
Tiny:    python -m jaxgen.train --cfg sdxl_lora --cfg-arg tiny   (a few steps at 32x32, for tests)

Settings are those of configs/sd_lora.py with model.xl=True: the U-Net is also conditioned on the pooled
text embedding and on time_ids made of each image's original size, its crop offset and the bucket size.
Without --set model.pretrained=PATH, the base is a tiny randomly initialised SDXL pipeline written to
runs/tiny_sdxl_base, because no pretrained weights are available offline. A real SDXL base trains at
--set data.image_size=1024 --set data.bucket_multiple=64 --set optim.learning_rate=1e-4.
"""

import importlib.util
import pathlib


def get_config(arg=None):
    # The sibling config file is loaded by path, because configs/ is not a Python package.
    path = pathlib.Path(__file__).with_name("sd_lora.py")
    spec = importlib.util.spec_from_file_location("jaxgen_config_sd_lora", path)
    sd_lora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_lora)
    return sd_lora.get_config(arg, xl=True)

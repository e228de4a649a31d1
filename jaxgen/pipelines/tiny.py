"""Write tiny, randomly initialised Stable Diffusion pipeline folders with diffusers and transformers.

No pretrained checkpoint can be downloaded at run time, so tests, the parity benchmark and the built-in
LoRA fine-tune start from these folders. They have the exact layout of real checkpoints (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/, plus text_encoder_2/ and tokenizer_2/ for SDXL), so
every code path that loads a real checkpoint runs on them. The weights are random: images from an
untrained pipeline are noise-like patterns, useful only to compare backends and to train from.

The tokenizer is a CLIP BPE tokenizer whose vocabulary contains the letters, some punctuation and whole
words for `WORDS`, so captions of the built-in digit data set tokenize to one token per word.

Requires torch, diffusers and transformers (the `torch` extra).
"""

from __future__ import annotations

import inspect
import json
import pathlib
import string
import tempfile

from jaxgen.data.image_caption.builtin import COLOURS, DIGIT_NAMES

WORDS = (
    "a", "photo", "of", "handwritten", "digit", "in", "on", "background", "the", "left", "right", "top",
    "bottom", "centre", "at", "cat", "dog", "blurry", *DIGIT_NAMES, *COLOURS,
)
MAX_LENGTH = 32
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def write_tokenizer(folder: str | pathlib.Path, *, max_length: int = MAX_LENGTH):
    """Write vocab.json, merges.txt and the tokenizer config of a small CLIP tokenizer; return the tokenizer."""
    from transformers import CLIPTokenizer

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for symbol in [*string.ascii_lowercase, *",.!'"]:
        vocab[symbol] = len(vocab)
        vocab[f"{symbol}</w>"] = len(vocab)
    merges: list[str] = []
    for word in sorted(set(WORDS)):
        pieces = [*word[:-1], f"{word[-1]}</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = f"{merged} {piece}"
            merged += piece
            if merged not in vocab:
                merges.append(merge)
                vocab[merged] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = pathlib.Path(scratch) / "vocab.json"
        merges_file = pathlib.Path(scratch) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_encoder(vocab_size: int, *, hidden: int, projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                            projection_dim=hidden, hidden_act="quick_gelu" if not projection else "gelu",
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(config).eval()


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()


def write_tiny_pipeline(folder: str | pathlib.Path, *, xl: bool = False, scheduler: str = "DDIMScheduler",
                        seed: int = 0) -> pathlib.Path:
    """Write a tiny random StableDiffusionPipeline (or StableDiffusionXLPipeline) folder and return its path.

    The U-Net works on 8x8 latents (64x64 images through the 8x VAE) with two resolution levels. The
    scheduler is SD's scaled-linear DDIM by default; `scheduler` names another diffusers scheduler class
    (for example "EulerDiscreteScheduler"), configured with the same betas.
    """
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel

    folder = pathlib.Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer")
    vocab_size = len(tokenizer)
    scheduler_class = getattr(diffusers, scheduler)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    noise_scheduler = scheduler_class(**{k: v for k, v in SD_SCHEDULER.items() if k in accepted})

    torch.manual_seed(seed)
    if xl:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, cross_attention_dim=64,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        ).eval()
        pipeline = diffusers.StableDiffusionXLPipeline(
            vae=_vae(seed + 1), text_encoder=_text_encoder(vocab_size, hidden=32, projection=False, seed=seed + 2),
            text_encoder_2=_text_encoder(vocab_size, hidden=32, projection=True, seed=seed + 3),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=noise_scheduler,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=4,
        ).eval()
        pipeline = diffusers.StableDiffusionPipeline(
            vae=_vae(seed + 1), text_encoder=_text_encoder(vocab_size, hidden=32, projection=False, seed=seed + 2),
            tokenizer=tokenizer, unet=unet, scheduler=noise_scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    pipeline.save_pretrained(folder)
    return folder

"""Torch twin of jaxgen's STDiT3 (Open-Sora 1.2), with the state_dict keys of Open-Sora's checkpoints.

Written from the structure of `opensora/models/stdit/stdit3.py` and `opensora/models/layers/blocks.py`
in hpcaitech/Open-Sora at tag v1.2.0, so a published STDiT3 state_dict (hpcai-tech/OpenSora-STDiT-v3)
loads with `load_state_dict(strict=True)`. Inputs and outputs are channels-first, [B, C, T, H, W], as in
Open-Sora; jaxgen's model is channels-last.

Kernels go through the backend's entry points, so they run the fused torch_npu kernels on an Ascend NPU.
Attention calls `torch_npu_backend.attention.scaled_dot_product_attention`, and the q/k RMSNorm is
`torch_npu_backend.norms.RMSNorm`. The temporal rotary embedding calls `norms.apply_rotary` in
"interleave" mode, the feature pairing of rotary_embedding_torch 0.5.3, which Open-Sora 1.2 uses.

Differences from Open-Sora 1.2, shared with jaxgen's model:
- T, H and W must be multiples of `patch_size`, where Open-Sora pads the latent and crops the output.
- Cross-attention keeps the padded [B, L] text layout and drops the tokens where `mask` is 0 with a key
  mask. Open-Sora packs the kept tokens of the batch into one sequence and uses xformers'
  BlockDiagonalMask, which gives each sample's queries the same set of keys.

Importing this module registers the twin in `torch_npu_backend.models.MODEL_TWINS`, so
`torch_twin(jaxgen_model)` and `jaxgen_twin(torch_model)` work after `import torch_npu_backend.stdit3`.

Axis letters: B batch, C channels, T latent frames, H W latent height and width, S = Nh * Nw spatial tokens
per frame, L text tokens, E caption features, N heads, D head dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxgen.models.stdit3 import FREQUENCY_EMBEDDING_SIZE, MAX_PERIOD, NORM_EPS, ROPE_THETA, STDiT3Config
from jaxgen.models.stdit3 import STDiT3 as JaxSTDiT3
from torch_npu_backend.attention import scaled_dot_product_attention
from torch_npu_backend.models import register_twin
from torch_npu_backend.norms import RMSNorm, apply_rotary

__all__ = ["STDiT3", "STDiT3Block", "position_embedding_2d", "timestep_embedding"]


def timestep_embedding(
    t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = MAX_PERIOD
) -> torch.Tensor:
    """Map scalars t [B] to sinusoidal features [B, dim] in float32: cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def position_embedding_2d(
    hidden_size: int,
    grid_h: int,
    grid_w: int,
    *,
    scale: float,
    base_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Return the 2D sine-cosine position embedding [Nh * Nw, C] of a patch grid, rows first.

    The first C/2 features encode the column and the last C/2 the row; see jaxgen.models.stdit3. Positions
    are float32 and the frequencies are rounded to `dtype`, the model's dtype: Open-Sora keeps them in a
    buffer that `model.to(dtype)` casts. The result is float32, or float64 for a float64 model.
    """
    half = hidden_size // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    inv_freq = inv_freq.to(dtype)
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) / scale * (base_size / grid_h)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) / scale * (base_size / grid_w)

    def sin_cos(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * inv_freq[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    col_features = sin_cos(cols)[None].expand(grid_h, grid_w, half)
    row_features = sin_cos(rows)[:, None].expand(grid_h, grid_w, half)
    return torch.cat([col_features, row_features], dim=-1).reshape(grid_h * grid_w, hidden_size)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _select_frames(frame_mask: torch.Tensor | None, x: torch.Tensor, x_zero: torch.Tensor, frames: int) -> torch.Tensor:
    """Take x [B, T * S, C] on frames where frame_mask [B, T] is True and x_zero elsewhere."""
    if frame_mask is None:
        return x
    b, tokens, c = x.shape
    x = x.reshape(b, frames, tokens // frames, c)
    x_zero = x_zero.reshape(b, frames, tokens // frames, c)
    return torch.where(frame_mask[:, :, None, None], x, x_zero).reshape(b, tokens, c)


class Mlp(nn.Module):
    """timm's Mlp as Open-Sora uses it: fc1, tanh-approximated GELU, fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar [B] through `mlp` = Linear, SiLU, Linear. Also Open-Sora's SizeEmbedder."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class CaptionEmbedder(nn.Module):
    """Projects text features [..., E] to [..., C]. Its buffer `y_embedding` [L, E] is the null caption."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids.bool()[:, None, None, None]
            caption = torch.where(drop, self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class Attention(nn.Module):
    """Self-attention with a fused `qkv`, optional RMSNorm `q_norm`/`k_norm` and optional rotary embedding."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Map x [B, L, C] to [B, L, C]. `rotary` is a pair of cos and sin tables [L, D]."""
        b, length, c = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, N, L, D]
        q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary[0][None, None], rotary[1][None, None]  # [1, 1, L, D]
            q = apply_rotary(q, cos, sin, rotary_mode="interleave")
            k = apply_rotary(k, cos, sin, rotary_mode="interleave")
        out = scaled_dot_product_attention(q, k, v, layout="BNSD")
        return self.proj(out.transpose(1, 2).reshape(b, length, c))


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention from image tokens to text tokens through `q_linear`, `kv_linear` and `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Map x [B, M, C] to [B, M, C], attending to the tokens of context [B, L, C] where keep [B, L] is True."""
        b, tokens, c = x.shape
        q = self.q_linear(x).view(b, tokens, self.num_heads, self.head_dim)
        k, v = self.kv_linear(context).view(b, context.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        out = scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], layout="BSND")
        return self.proj(out.reshape(b, tokens, c))


class STDiT3Block(nn.Module):
    """One spatial or temporal STDiT3 block: modulated self-attention, cross-attention, modulated MLP."""

    def __init__(self, config: STDiT3Config, *, temporal: bool):
        super().__init__()
        c = config.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(c, eps=NORM_EPS, elementwise_affine=False)
        self.attn = Attention(c, config.num_heads, qk_norm=config.qk_norm)
        self.cross_attn = MultiHeadCrossAttention(c, config.num_heads)
        self.norm2 = nn.LayerNorm(c, eps=NORM_EPS, elementwise_affine=False)
        self.mlp = Mlp(c, config.mlp_hidden_size, c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        keep: torch.Tensor,
        t_mlp: torch.Tensor,
        *,
        frames: int,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        frame_mask: torch.Tensor | None = None,
        t0_mlp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Map tokens x [B, T * S, C], frames first, to the same shape; see the jaxgen block for the arguments."""
        b, tokens, c = x.shape
        spatial = tokens // frames
        mods = (self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1)).chunk(6, dim=1)
        zero = None
        if frame_mask is not None:
            zero = (self.scale_shift_table[None] + t0_mlp.reshape(b, 6, -1)).chunk(6, dim=1)

        normed = self.norm1(x)
        x_m = _modulate(normed, mods[0], mods[1])
        if zero is not None:
            x_m = _select_frames(frame_mask, x_m, _modulate(normed, zero[0], zero[1]), frames)
        x_m = x_m.reshape(b, frames, spatial, c)
        if self.temporal:
            x_m = x_m.transpose(1, 2).reshape(b * spatial, frames, c)
            x_m = self.attn(x_m, rotary).reshape(b, spatial, frames, c).transpose(1, 2)
        else:
            x_m = self.attn(x_m.reshape(b * frames, spatial, c))
        x_m = x_m.reshape(b, tokens, c)
        gated = mods[2] * x_m
        if zero is not None:
            gated = _select_frames(frame_mask, gated, zero[2] * x_m, frames)
        x = x + gated

        x = x + self.cross_attn(x, context, keep)

        normed = self.norm2(x)
        x_m = _modulate(normed, mods[3], mods[4])
        if zero is not None:
            x_m = _select_frames(frame_mask, x_m, _modulate(normed, zero[3], zero[4]), frames)
        x_m = self.mlp(x_m)
        gated = mods[5] * x_m
        if zero is not None:
            gated = _select_frames(frame_mask, gated, zero[5] * x_m, frames)
        return x + gated


class T2IFinalLayer(nn.Module):
    """`norm_final` (no parameters) modulated by the timestep embedding, then `linear` to the patch values."""

    def __init__(self, hidden_size: int, patch_values: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_values)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, *, frames: int, frame_mask=None, t0=None) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x_m = _modulate(self.norm_final(x), shift, scale)
        if frame_mask is not None:
            shift_zero, scale_zero = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            # As in Open-Sora 1.2: the timestep-0 frames normalise the already modulated tokens.
            x_m = _select_frames(frame_mask, x_m, _modulate(self.norm_final(x_m), shift_zero, scale_zero), frames)
        return self.linear(x_m)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches projected by the Conv3d `proj`, flattened to tokens [B, Nt * Nh * Nw, C]."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RotaryEmbedding(nn.Module):
    """Rotary embedding whose `freqs` [D/2] are the frozen frequencies theta^(-2i/D), saved as `rope.freqs`."""

    def __init__(self, dim: int):
        super().__init__()
        freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos and sin [length, D] for positions 0..length-1, each frequency repeated for its pair.

        The tables have the dtype of `freqs`, as in rotary_embedding_torch, so a model cast to bfloat16
        computes the angles in bfloat16 as Open-Sora does.
        """
        positions = torch.arange(length, dtype=self.freqs.dtype, device=self.freqs.device)
        angles = (positions[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)
        return torch.cos(angles), torch.sin(angles)


class STDiT3(nn.Module):
    """Open-Sora 1.2's STDiT3 from a jaxgen STDiT3Config, channels-first, with Open-Sora's state_dict keys.

    Initialisation follows Open-Sora's `initialize_weights`.
    """

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(config, temporal=False) for _ in range(config.depth)])
        self.temporal_blocks = nn.ModuleList([STDiT3Block(config, temporal=True) for _ in range(config.depth)])
        self.final_layer = T2IFinalLayer(c, int(np.prod(config.patch_size)) * config.out_channels)
        self.rope = RotaryEmbedding(config.head_dim)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        for block in self.temporal_blocks:
            for layer in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(layer.weight)

    def null_caption(self, batch_size: int) -> torch.Tensor:
        """Return the null caption [B, 1, L, E] for the unconditional half of classifier-free guidance."""
        return self.y_embedder.y_embedding[None, None].expand(batch_size, 1, -1, -1)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict [B, out_channels, T, H, W] for the latent x [B, in_channels, T, H, W], as Open-Sora's forward.

        `fps`, `height` and `width` are [B] tensors (or numbers) and required; only the first sample's height
        and width count. The other arguments are those of jaxgen's STDiT3.__call__.
        """
        config = self.config
        self._check_inputs(x, y, mask, x_mask, fps, height, width)
        b, _, frames, h, w = x.shape
        pt, ph, pw = config.patch_size
        nt, nh, nw = frames // pt, h // ph, w // pw
        spatial = nh * nw
        dtype = self.x_embedder.proj.weight.dtype
        device = x.device

        base_size = round(spatial**0.5)
        scale = (_first(height) * _first(width)) ** 0.5 / config.input_sq_size
        pos_embed = position_embedding_2d(
            config.hidden_size, nh, nw, scale=scale, base_size=base_size, dtype=dtype, device=device
        )

        # Open-Sora rounds the timestep to the model dtype first, so a bfloat16 model embeds 999 as 1000.
        timestep = torch.as_tensor(timestep, device=device).to(dtype).reshape(-1).expand(b)
        fps = torch.as_tensor(fps, dtype=torch.float32, device=device).reshape(-1).expand(b)
        fps_embedding = self.fps_embedder(fps)
        t = self.t_embedder(timestep) + fps_embedding
        t_mlp = self.t_block(t)
        t0 = t0_mlp = frame_mask = None
        if x_mask is not None:
            frame_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_embedding
            t0_mlp = self.t_block(t0)

        context = self.y_embedder(y.to(dtype), force_drop_ids)[:, 0]  # [B, L, C]
        keep = torch.ones(context.shape[:2], dtype=torch.bool, device=device) if mask is None else mask != 0

        tokens = self.x_embedder(x.to(dtype)).reshape(b, nt, spatial, config.hidden_size)
        tokens = (tokens + pos_embed.to(dtype)).reshape(b, nt * spatial, config.hidden_size)

        rotary = self.rope.tables(nt)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            tokens = spatial_block(tokens, context, keep, t_mlp, frames=nt, frame_mask=frame_mask, t0_mlp=t0_mlp)
            tokens = temporal_block(
                tokens, context, keep, t_mlp, frames=nt, rotary=rotary, frame_mask=frame_mask, t0_mlp=t0_mlp
            )

        out = self.final_layer(tokens, t, frames=nt, frame_mask=frame_mask, t0=t0)  # [B, Nt * S, P]
        out = out.reshape(b, nt, nh, nw, pt, ph, pw, config.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, config.out_channels, frames, h, w)
        return out.float()

    def _check_inputs(self, x, y, mask, x_mask, fps, height, width) -> None:
        config = self.config
        if x.ndim != 5 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"STDiT3 expects a channels-first latent [B, {config.in_channels}, T, H, W], got shape "
                f"{tuple(x.shape)}; permute a channels-last latent with x.permute(0, 4, 1, 2, 3)."
            )
        for axis, size, patch in zip("THW", x.shape[2:], config.patch_size):
            if size % patch:
                raise ValueError(
                    f"latent {axis}={size} is not a multiple of patch size {patch} (patch_size "
                    f"{config.patch_size}); pad or crop the latent to a multiple of {patch} along {axis}."
                )
        if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[1] != 1 or y.shape[3] != config.caption_channels:
            raise ValueError(
                f"STDiT3 expects text features y [B, 1, L, {config.caption_channels}] with B={x.shape[0]}, got "
                f"shape {tuple(y.shape)}; add the axis with y[:, None] if y is [B, L, E]."
            )
        if mask is not None and tuple(mask.shape) != (y.shape[0], y.shape[2]):
            raise ValueError(
                f"text mask has shape {tuple(mask.shape)}, expected [B, L] = {[y.shape[0], y.shape[2]]}; "
                "repeat a shared mask along the batch."
            )
        if x_mask is not None and tuple(x_mask.shape) != (x.shape[0], x.shape[2] // config.patch_size[0]):
            raise ValueError(
                f"x_mask has shape {tuple(x_mask.shape)}, expected [B, latent frames / patch T] = "
                f"{[x.shape[0], x.shape[2] // config.patch_size[0]]}."
            )
        for name, value in (("fps", fps), ("height", height), ("width", width)):
            if value is None:
                raise ValueError(f"STDiT3 needs {name}, a [B] tensor or a number; Open-Sora passes it with the batch.")


def _first(value: torch.Tensor | float) -> float:
    """Return the first element of a tensor, or a number, as a Python float."""
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0].item())
    return float(value)


register_twin(JaxSTDiT3, STDiT3, build_torch=STDiT3, read_config=lambda module: module.config)

"""torch_npu_backend: device choice, NPU attention dispatch, fused norms and precision guards.

No Ascend runtime exists on the test machines, so the NPU paths run against the torch_npu
stand-in of tests/npu_stub.py, with CPU tensors and backend="npu" in place of NPU tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from npu_stub import install_torch_npu_stub

from torch_npu_backend import attention, device, norms, precision
from torch_npu_backend.attention import NPUAttnProcessor, scaled_dot_product_attention
from torch_npu_backend.device import DeviceUnavailableError, distributed_backend, resolve_device

# Both paths compute in float32 and differ only in summation order (measured max error 8e-7).
ATOL = 1e-5
RTOL = 1e-5

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=8,
    attention_head_dim=4,
)


@pytest.fixture
def torch_npu_stub(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV_VAR, raising=False)
    return install_torch_npu_stub(monkeypatch)


@pytest.fixture
def no_torch_npu(monkeypatch):
    """Make `import torch_npu` fail as when the package is not installed."""
    monkeypatch.delenv(device.DEVICE_ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)


def calls_named(stub, name: str) -> list[dict]:
    return [arguments for kernel, arguments in stub.calls if kernel == name]


# ----- device --------------------------------------------------------------------------------


# torch.device("npu") and torch.autocast("npu") need the PrivateUse1 device type renamed to "npu",
# which lasts for the whole process, so these checks run in a child process.
NPU_DEVICE_SCRIPT = """
import json, os, pytest, torch
from npu_stub import install_torch_npu_stub
from torch_npu_backend import precision
from torch_npu_backend.device import resolve_device

install_torch_npu_stub(pytest.MonkeyPatch(), device_count=2, register_device_type=True)
results = {"auto": str(resolve_device()), "explicit": str(resolve_device("npu"))}
os.environ["JAXGEN_TORCH_DEVICE"] = "npu:1"
results["env"] = str(resolve_device())
context = precision.autocast(torch.device("npu", 0), torch.float16)
results["autocast_device"] = context.device
with context:
    results["autocast_enabled"] = torch.is_autocast_enabled("npu")
    results["autocast_dtype"] = str(torch.get_autocast_dtype("npu"))
print(json.dumps(results))
"""


def test_npu_device_in_child_process():
    tests_dir = pathlib.Path(__file__).resolve().parent
    env = {key: value for key, value in os.environ.items() if key != device.DEVICE_ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir.parent), str(tests_dir), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", NPU_DEVICE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])

    assert results["auto"] == "npu:0"
    assert results["explicit"] == "npu:0"
    assert results["env"] == "npu:1"
    assert results["autocast_device"] == "npu"
    assert results["autocast_enabled"] is True
    assert results["autocast_dtype"] == "torch.float16"


def test_resolve_device_falls_back_to_cpu(no_torch_npu):
    assert resolve_device() == torch.device("cpu")


def test_resolve_device_env_override(monkeypatch):
    install_torch_npu_stub(monkeypatch, device_count=2)
    monkeypatch.setenv(device.DEVICE_ENV_VAR, "cpu")
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setenv(device.DEVICE_ENV_VAR, "npu:2")
    with pytest.raises(DeviceUnavailableError, match="index 2"):
        resolve_device()


def test_npu_error_package_missing(no_torch_npu):
    with pytest.raises(DeviceUnavailableError) as error:
        resolve_device("npu")
    assert "torch_npu package is not installed" in str(error.value)
    assert "torch_npu==2.13.0" in str(error.value)


def test_npu_error_runtime_missing(monkeypatch, tmp_path):
    # An installed torch_npu whose import fails the way it does without the CANN libraries.
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("libascendcl.so: cannot open shared object file: No such file or directory")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delenv(device.DEVICE_ENV_VAR, raising=False)

    with pytest.raises(DeviceUnavailableError) as error:
        resolve_device("npu")
    message = str(error.value)
    assert "torch_npu is installed, but importing it failed" in message
    assert "ImportError: libascendcl.so: cannot open shared object file" in message
    assert "ASCEND_HOME_PATH" in message
    assert "LD_LIBRARY_PATH" in message
    assert resolve_device() == torch.device("cpu")


def test_npu_error_no_device(monkeypatch):
    install_torch_npu_stub(monkeypatch, device_count=0)
    monkeypatch.delenv(device.DEVICE_ENV_VAR, raising=False)
    with pytest.raises(DeviceUnavailableError, match="reports no NPU"):
        resolve_device("npu")
    assert resolve_device() == torch.device("cpu")


def test_cuda_error_messages(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceUnavailableError, match="no CUDA support"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="finds no CUDA device"):
        resolve_device("cuda")


def test_resolve_device_rejects_unknown():
    with pytest.raises(ValueError, match="Unsupported device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="Invalid device index"):
        resolve_device("cpu:x")


@pytest.mark.parametrize("target, expected", [
    (torch.device("cpu"), "gloo"), ("cuda:1", "nccl"), ("npu", "hccl"), ("npu:3", "hccl"),
])
def test_distributed_backend(target, expected):
    assert distributed_backend(target) == expected


def test_distributed_backend_rejects_unknown():
    with pytest.raises(ValueError, match="No distributed backend for device type 'mps'"):
        distributed_backend("mps")


# ----- attention on the NPU path -------------------------------------------------------------

B, N, L, S, D = 2, 3, 5, 7, 16


def qkv(layout: str, query_len: int = L, key_len: int = S, head_dim: int = D, v_head_dim: int | None = None,
        dtype=torch.float32):
    """Return random q, k, v in [B, N, *, D] and the same tensors in `layout`."""
    generator = torch.Generator().manual_seed(0)
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    shapes = [(B, N, query_len, head_dim), (B, N, key_len, head_dim), (B, N, key_len, v_head_dim)]
    tensors = [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
    return tensors, [to_layout(tensor, layout) for tensor in tensors]


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x
    x = x.transpose(1, 2)
    return x.flatten(2) if layout == "BSH" else x


def keep_mask() -> torch.Tensor:
    """Return a boolean keep mask [B, 1, L, S] in which every query keeps at least one key."""
    mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    return mask


MASK_CASES = {
    "none": lambda: (None, None),
    # Boolean keep masks: [B, 1, L, S] for padding, [L, S] shared by the batch.
    "bool_b1ls": lambda: (keep_mask(), keep_mask()),
    "bool_ls": lambda: (keep_mask()[0, 0], keep_mask()[0, 0]),
    # Additive masks: 0 keeps, and -inf or diffusers' -10000.0 drops.
    "additive_inf": lambda: (torch.zeros(B, N, L, S).masked_fill(~keep_mask(), float("-inf")),
                             keep_mask().expand(B, N, L, S)),
    "additive_10000": lambda: ((~keep_mask()).float() * -10000.0, keep_mask()),
}


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH"])
@pytest.mark.parametrize("mask_case", sorted(MASK_CASES))
def test_npu_attention_matches_sdpa(torch_npu_stub, layout, mask_case):
    (q, k, v), (lq, lk, lv) = qkv(layout)
    attn_mask, keep = MASK_CASES[mask_case]()
    num_heads = N if layout == "BSH" else None

    out = scaled_dot_product_attention(lq, lk, lv, attn_mask=attn_mask, layout=layout, num_heads=num_heads,
                                       backend="npu")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    torch.testing.assert_close(out, to_layout(expected, layout), atol=ATOL, rtol=RTOL)

    (call,) = calls_named(torch_npu_stub, "npu_fusion_attention")
    assert call["input_layout"] == layout
    assert call["head_num"] == N
    assert call["scale"] == pytest.approx(1 / math.sqrt(D), rel=1e-12)
    assert call["sparse_mode"] == 0
    if keep is None:
        assert call["atten_mask"] is None
    else:
        # The NPU mask marks dropped keys: the inverse of SDPA's keep mask, in a kernel shape.
        assert call["atten_mask"].dtype == torch.bool
        assert call["atten_mask"].ndim == 4
        assert torch.equal(call["atten_mask"], ~keep.reshape(call["atten_mask"].shape[:2] + (L, S)).expand_as(
            call["atten_mask"]))


@pytest.mark.parametrize("layout", ["BNSD", "BSND"])
@pytest.mark.parametrize("query_len, key_len", [(6, 6), (4, 7)])
def test_npu_attention_causal(torch_npu_stub, layout, query_len, key_len):
    (q, k, v), (lq, lk, lv) = qkv(layout, query_len, key_len)

    out = scaled_dot_product_attention(lq, lk, lv, is_causal=True, layout=layout, backend="npu")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, to_layout(expected, layout), atol=ATOL, rtol=RTOL)

    (call,) = calls_named(torch_npu_stub, "npu_fusion_attention")
    assert call["sparse_mode"] == 2
    assert call["atten_mask"].shape == (2048, 2048)


def test_npu_attention_explicit_scale(torch_npu_stub):
    (q, k, v), _ = qkv("BNSD")
    out = scaled_dot_product_attention(q, k, v, scale=0.3, backend="npu")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=ATOL, rtol=RTOL)
    assert calls_named(torch_npu_stub, "npu_fusion_attention")[0]["scale"] == 0.3


def test_npu_attention_rejects_bias(torch_npu_stub):
    (q, k, v), _ = qkv("BNSD")
    bias = torch.linspace(-2, 2, S).expand(B, N, L, S)
    with pytest.raises(ValueError, match="backend='torch'"):
        scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="npu")
    assert torch_npu_stub.calls == []


def test_attention_by_device_uses_sdpa_on_cpu(torch_npu_stub):
    (q, k, v), _ = qkv("BNSD")
    out = scaled_dot_product_attention(q, k, v, attn_mask=keep_mask())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask()), atol=0, rtol=0)
    assert torch_npu_stub.calls == []


@pytest.mark.parametrize("head_dim, v_head_dim", [(776, 776), (16, 32)])
def test_npu_attention_unsupported_head_dim_falls_back(torch_npu_stub, monkeypatch, caplog, head_dim, v_head_dim):
    monkeypatch.setattr(attention, "_warned_fallbacks", set())
    (q, k, v), (lq, lk, lv) = qkv("BSND", head_dim=head_dim, v_head_dim=v_head_dim)
    mask = keep_mask()
    mask[0, 0, 1] = False  # a query with every key dropped returns zeros, as in SDPA

    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        for _ in range(2):
            out = scaled_dot_product_attention(lq, lk, lv, attn_mask=mask, layout="BSND", backend="npu")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, to_layout(expected, "BSND"), atol=ATOL, rtol=RTOL)
    assert torch_npu_stub.calls == []
    warnings = [record for record in caplog.records if "does not take qk head dim" in record.getMessage()]
    assert len(warnings) == 1


def test_npu_attention_head_dim_multiple_limit(torch_npu_stub, monkeypatch):
    # Older kernels need D to be a multiple of 16, which the module setting can require.
    monkeypatch.setattr(attention, "NPU_HEAD_DIM_MULTIPLE", 16)
    monkeypatch.setattr(attention, "_warned_fallbacks", set())
    (q, k, v), _ = qkv("BNSD", head_dim=8)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, backend="npu")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=RTOL)
    assert torch_npu_stub.calls == []


def test_npu_attention_rejects_float64(torch_npu_stub):
    (q, k, v), _ = qkv("BNSD", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        scaled_dot_product_attention(q, k, v, backend="npu")
    assert torch_npu_stub.calls == []


def test_npu_attention_without_torch_npu(no_torch_npu):
    (q, k, v), _ = qkv("BNSD")
    with pytest.raises(DeviceUnavailableError, match="not installed"):
        scaled_dot_product_attention(q, k, v, backend="npu")


def test_attention_argument_errors():
    (q, k, v), (hq, hk, hv) = qkv("BSH")
    with pytest.raises(ValueError, match="not both"):
        scaled_dot_product_attention(q, k, v, attn_mask=keep_mask(), is_causal=True)
    with pytest.raises(ValueError, match="needs num_heads"):
        scaled_dot_product_attention(hq, hk, hv, layout="BSH")
    with pytest.raises(ValueError, match="Unknown attention layout 'SBH'"):
        scaled_dot_product_attention(q, k, v, layout="SBH")
    with pytest.raises(ValueError, match="num_heads=4 does not match 3 heads"):
        scaled_dot_product_attention(q, k, v, num_heads=4)


# ----- diffusers attention processor --------------------------------------------------------


def unet_inputs():
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 8, generator=generator)
    token_mask = torch.ones(2, 5)
    token_mask[1, 3:] = 0  # the second prompt has two padding tokens
    return sample, context, token_mask


@pytest.mark.parametrize("backend", [None, "npu"])
def test_attn_processor_unet_matches_default(torch_npu_stub, backend):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    sample, context, token_mask = unet_inputs()
    timestep = torch.tensor([3, 700])

    with torch.no_grad():
        expected = unet(sample, timestep, context, encoder_attention_mask=token_mask).sample
        unet.set_attn_processor(NPUAttnProcessor(backend=backend))
        out = unet(sample, timestep, context, encoder_attention_mask=token_mask).sample

    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    attention_layers = len(unet.attn_processors)
    fused_calls = calls_named(torch_npu_stub, "npu_fusion_attention")
    assert len(fused_calls) == (attention_layers if backend == "npu" else 0)
    assert all(call["input_layout"] == "BSND" for call in fused_calls)


def test_attn_processor_vae_matches_default(torch_npu_stub):
    # The VAE's mid-block attention takes [B, C, H, W] input, a group norm and a residual connection.
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16,), norm_num_groups=8, latent_channels=2, sample_size=8).eval()
    image = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        expected = vae(image, sample_posterior=False).sample
        vae.set_attn_processor(NPUAttnProcessor(backend="npu"))
        out = vae(image, sample_posterior=False).sample

    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert len(calls_named(torch_npu_stub, "npu_fusion_attention")) == 2  # encoder and decoder mid blocks


# ----- fused norms ---------------------------------------------------------------------------


# The kernel takes gamma in the dtype of x, so in bfloat16 the NPU path multiplies by a rounded
# weight. 2**-6 allows two bfloat16 steps, since bfloat16 has 8 significant bits.
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 0, 2**-6)])
def test_rms_norm_npu_matches_torch(torch_npu_stub, dtype, atol, rtol):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, generator=generator).to(dtype)
    layer = norms.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(16, generator=generator) + 0.5)

        reference = F.rms_norm(x.float(), (16,), layer.weight, eps=1e-5).to(dtype)
        torch_out = layer(x)
        layer.backend = "npu"
        npu_out = layer(x)

    torch.testing.assert_close(torch_out, reference, atol=atol, rtol=rtol)
    torch.testing.assert_close(npu_out, torch_out, atol=atol, rtol=rtol)
    assert npu_out.dtype == dtype
    (call,) = calls_named(torch_npu_stub, "npu_rms_norm")
    assert call["gamma"].dtype == dtype
    assert call["epsilon"] == 1e-5


def complex_rotary(x: torch.Tensor, angles: torch.Tensor, rotary_mode: str) -> torch.Tensor:
    """Rotate feature pairs by `angles` [S, D/2] with complex multiplication (an independent reference)."""
    half = x.shape[-1] // 2
    if rotary_mode == "half":
        pairs = torch.complex(x[..., :half], x[..., half:])
    else:
        pairs = torch.complex(x[..., 0::2], x[..., 1::2])
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    if rotary_mode == "half":
        return torch.cat((rotated.real, rotated.imag), dim=-1)
    return torch.stack((rotated.real, rotated.imag), dim=-1).flatten(-2)


@pytest.mark.parametrize("rotary_mode", ["half", "interleave"])
@pytest.mark.parametrize("layout", ["BNSD", "BSND"])
def test_rotary_npu_matches_reference(torch_npu_stub, rotary_mode, layout):
    seq, head_dim = 6, 8
    x_bnsd = torch.randn(2, 3, seq, head_dim, generator=torch.Generator().manual_seed(5))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), 10000.0 ** (-torch.arange(head_dim // 2) / 4))
    per_feature = torch.cat((angles, angles), -1) if rotary_mode == "half" else angles.repeat_interleave(2, -1)
    table_shape = (1, 1, seq, head_dim) if layout == "BNSD" else (1, seq, 1, head_dim)
    cos, sin = per_feature.cos().reshape(table_shape), per_feature.sin().reshape(table_shape)
    x = x_bnsd if layout == "BNSD" else x_bnsd.transpose(1, 2)

    expected = complex_rotary(x_bnsd, angles, rotary_mode)
    expected = expected if layout == "BNSD" else expected.transpose(1, 2)
    torch_out = norms.apply_rotary(x, cos, sin, rotary_mode=rotary_mode, backend="torch")
    npu_out = norms.apply_rotary(x, cos, sin, rotary_mode=rotary_mode, backend="npu")

    torch.testing.assert_close(torch_out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(npu_out, expected, atol=1e-6, rtol=1e-6)
    assert len(calls_named(torch_npu_stub, "npu_rotary_mul")) == 1


def test_rotary_unsupported_table_uses_torch(torch_npu_stub):
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(6))
    cos, sin = torch.full((1, 3, 6, 8), 0.6), torch.full((1, 3, 6, 8), 0.8)  # 1NSD is not a kernel table shape
    out = norms.apply_rotary(x, cos, sin, backend="npu")
    torch.testing.assert_close(out, x * cos + norms.rotate(x) * sin, atol=0, rtol=0)
    assert torch_npu_stub.calls == []


# ----- precision -----------------------------------------------------------------------------


def test_autocast_cpu_dtypes():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.autocast("cpu", torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with precision.autocast(torch.device("cpu"), torch.float32):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="autocast dtype"):
        precision.autocast("cpu", torch.float64)


def test_grad_scaler_per_device(torch_npu_stub):
    assert precision.grad_scaler("cpu", torch.float16).is_enabled()
    assert not precision.grad_scaler("cpu", torch.bfloat16).is_enabled()
    npu_scaler = precision.grad_scaler("npu:0", torch.float16, init_scale=1024.0)
    assert isinstance(npu_scaler, torch.npu.amp.GradScaler)
    assert calls_named(torch_npu_stub, "npu.amp.GradScaler") == [{"enabled": True, "init_scale": 1024.0}]


def test_keep_norms_in_float32():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GroupNorm(2, 8),
                                norms.RMSNorm(8))
    keys = list(model.state_dict())
    model.to(torch.bfloat16)
    seen_dtypes = []
    model[1].register_forward_hook(lambda module, args, output: seen_dtypes.append((args[0].dtype, output.dtype)))

    assert precision.keep_norms_in_float32(model) == ["1", "2", "3"]
    assert precision.keep_norms_in_float32(model) == ["1", "2", "3"]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out = model(x)

    assert out.dtype == torch.bfloat16
    assert model[0].weight.dtype == torch.bfloat16
    assert all(model[index].weight.dtype == torch.float32 for index in (1, 2, 3))
    # The hook registered first gets the norm's float32 input and output, and callers get bfloat16.
    assert seen_dtypes == [(torch.float32, torch.float32)]
    assert list(model.state_dict()) == keys


def test_float32_loss_and_softmax():
    generator = torch.Generator().manual_seed(8)
    prediction = torch.randn(4, 8, generator=generator).to(torch.bfloat16)
    target = torch.randn(4, 8, generator=generator).to(torch.bfloat16)
    with precision.autocast("cpu", torch.bfloat16):
        loss = precision.in_float32(F.mse_loss)(prediction, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.mse_loss(prediction.float(), target.float()), atol=0, rtol=0)

    logits = (torch.randn(4, 8, generator=generator) * 20).to(torch.bfloat16)
    probabilities = precision.softmax_float32(logits)
    assert probabilities.dtype == torch.bfloat16
    torch.testing.assert_close(probabilities, torch.softmax(logits.float(), -1).to(torch.bfloat16), atol=0, rtol=0)


def test_check_no_float64_names_paths():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].bias.data = model[0].bias.data.double()
    batch = {"latents": torch.zeros(2), "cond": [torch.zeros(2), torch.zeros(2, dtype=torch.float64)]}

    with pytest.raises(TypeError) as error:
        precision.check_no_float64({"unet": model, "batch": batch}, where="inputs")
    message = str(error.value)
    assert "inputs['unet'].0.bias" in message
    assert "inputs['batch']['cond'][1]" in message
    assert "inputs['unet'].0.weight" not in message
    precision.check_no_float64(torch.zeros(2, dtype=torch.float16))


def test_to_device_rejects_float64_before_npu(torch_npu_stub):
    model = torch.nn.Linear(2, 2).double()
    with pytest.raises(TypeError, match=r"unet\.weight, unet\.bias"):
        precision.to_device(model, "npu:0", where="unet")
    assert model.weight.device.type == "cpu"

    batch = {"x": torch.zeros(2, dtype=torch.float64), "ids": (torch.arange(3),)}
    moved = precision.to_device(batch, "cpu")
    assert moved["x"].dtype == torch.float64
    assert isinstance(moved["ids"], tuple)

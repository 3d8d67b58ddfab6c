"""Fused adapter kernels against the PyTorch reference: the output and every gradient.

Without CUDA the Triton kernels run in the CPU interpreter: TRITON_INTERPRET=1 is set while
vlds.kernels.fused_adapter is imported (triton decides interpreted vs compiled when a kernel is
decorated) and while this module's tests run (the interpreter reads it again at launch), and
unset in between, so other test modules, and the processes they start, never see it. The
kernels use triton.language builtins only, so this works even when triton was imported before
(transformers imports it). With CUDA the same cases run compiled on the GPU.

    pytest tests/test_kernels.py              # a subset: every d, b and dtype once (~30 s)
    pytest tests/test_kernels.py -m slow      # the rest of d {512, 768} x b {24, 48, 96} x dtype
    pytest tests/test_kernels.py -m gpu       # bf16 and large M on CUDA (skips without)

Every case draws fresh random inputs (the seed is in the failure message), and every kernel
output is allocated NaN-filled (`poison_outputs`), so an element the kernel never wrote fails.
Errors are measured against an fp64 reference and must stay within 2x eager PyTorch's own error
in the same dtype (or a small floor relative to the largest reference value).
"""

from __future__ import annotations

import random

import pytest
import torch

from vlds.config import ConfigError
from vlds.kernels import adapter_forward, adapter_reference

INTERPRET = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
with pytest.MonkeyPatch.context() as env:  # see interpreter_env for why only here
    for key, value in INTERPRET.items():
        env.setenv(key, value)
    pytest.importorskip("triton")
    from vlds.kernels import fused_adapter as fa

DEVICE = "cpu" if fa.interpreting() else "cuda"
GRAD_NAMES = ("dh", "dW_down", "db_down", "dW_up", "db_up")
# floor on max |err| / max |ref|: fp32 sums over ~1k rows; 16-bit storage rounding
REL_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TOKENS = 1151  # ragged: not a multiple of any block size
DEFAULT = [  # (M, d, b, dtype): every d, b and dtype at least once
    (TOKENS, 768, 96, torch.float32),
    (TOKENS, 512, 24, torch.float16),
    (TOKENS, 768, 48, torch.float16),
    (77, 200, 20, torch.float32),  # d and b not multiples of the blocks: every mask
]
FULL = [
    (TOKENS, d, b, dt)
    for d in (512, 768)
    for b in (24, 48, 96)
    for dt in (torch.float32, torch.float16)
    if (TOKENS, d, b, dt) not in DEFAULT
]


@pytest.fixture(autouse=True, scope="module")
def interpreter_env():
    with pytest.MonkeyPatch.context() as env:
        for key, value in INTERPRET.items():
            env.setenv(key, value)
        yield


gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (compiled Triton kernels)")


def adapter_inputs(m, d, b, dtype, w_dtype=None, seed=None, lead=()):
    """Fresh random (h, w_down, b_down, w_up, b_up, dy), scaled so that gelu is non-linear
    (z ~ N(0, 1)) and the adapter branch is as large as the residual."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    w_dtype = w_dtype or dtype

    def r(*shape, scale=1.0, dt=dtype):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)
        return t.to(DEVICE).requires_grad_()

    h = r(*lead, m, d)
    weights = [r(b, d, scale=d**-0.5, dt=w_dtype), r(b, scale=0.5, dt=w_dtype)]
    weights += [r(d, b, scale=b**-0.5, dt=w_dtype), r(d, scale=0.5, dt=w_dtype)]
    dy = torch.randn(*lead, m, d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return seed, [h, *weights], dy


def forward_backward(fn, args, dy):
    y = fn(*args)
    return [y, *torch.autograd.grad(y, args, dy)]


def errors(args, dy, fused_out):
    """{name: (fused max abs err, eager max abs err, max |ref|)}, all against fp64."""
    f64 = [a.detach().double().requires_grad_() for a in args]
    ref = forward_backward(adapter_reference, f64, dy.double())
    eager_args = [a.detach().requires_grad_() for a in args]
    eager = forward_backward(adapter_reference, eager_args, dy)
    out = {}
    for name, f, e, r in zip(("y", *GRAD_NAMES), fused_out, eager, ref, strict=True):
        assert f.shape == r.shape and f.dtype == e.dtype, name
        out[name] = (
            (f.double() - r).abs().max().item(),
            (e.double() - r).abs().max().item(),
            r.abs().max().item(),
        )
    return out


def check_case(m, d, b, dtype, **kw):
    seed, args, dy = adapter_inputs(m, d, b, dtype, **kw)
    with fa.poison_outputs():
        fused = forward_backward(lambda *a: adapter_forward(*a, mode="on"), args, dy)
    errs = errors(args, dy, fused)
    floor = REL_FLOOR[dtype]
    for name, (err, eager_err, scale) in errs.items():
        print(f"M={m} d={d} b={b} {str(dtype)[6:]} {name}: fused {err:.2e} eager {eager_err:.2e}")
        assert err <= max(2 * eager_err, floor * scale), (
            f"{name} (M={m}, d={d}, b={b}, {dtype}, seed {seed}): max abs error {err:.3e} vs "
            f"eager {eager_err:.3e}, max |ref| {scale:.3e}"
        )  # NaN (an unwritten element) fails here too
    return errs


@pytest.mark.parametrize(("m", "d", "b", "dtype"), DEFAULT)
def test_fused_adapter_matches_reference(m, d, b, dtype):
    check_case(m, d, b, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("m", "d", "b", "dtype"), FULL)
def test_fused_adapter_matches_reference_full_grid(m, d, b, dtype):
    check_case(m, d, b, dtype)


def test_fp32_gpu_tiling(monkeypatch):
    # the interpreter tiles every dtype like 16-bit (_config); here the GPU's fp32 tiling
    monkeypatch.setattr(fa, "_config", lambda b, dtype, device: fa._blocks(b, dtype))
    check_case(77, 200, 20, torch.float32)


def test_leading_shape_and_fp32_master_weights():
    # (B, T, d) fp16 activations with fp32 parameters: cast like the reference, fp32 grads back
    errs = check_case(45, 96, 12, torch.float16, w_dtype=torch.float32, lead=(3,))
    assert set(errs) == {"y", *GRAD_NAMES}


def test_the_triton_kernels_really_run(monkeypatch):
    launches = []
    hooks = [(k, lambda *a, k=k, **kw: launches.append(k.__name__) or False) for k in (
        fa._through_kernel, fa._weight_grad_kernel)]  # fmt: skip
    for kernel, hook in hooks:
        kernel.add_pre_run_hook(hook)

    def refuse(*_):
        raise AssertionError("the fused path called the reference")

    monkeypatch.setattr("vlds.kernels.adapter_reference", refuse)
    try:
        _, args, dy = adapter_inputs(70, 64, 16, torch.float32)
        y = adapter_forward(*args, mode="on")
        assert launches == ["_through_kernel"]
        y.backward(dy)
        assert launches == ["_through_kernel"] * 2 + ["_weight_grad_kernel"]
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)
    assert fa.interpreting() == (DEVICE == "cpu")


def test_no_grad_forward_saves_nothing_and_matches():
    _, args, _ = adapter_inputs(70, 64, 16, torch.float32)
    with torch.no_grad(), fa.poison_outputs():
        y = adapter_forward(*args, mode="on")
    assert y.grad_fn is None
    torch.testing.assert_close(y, adapter_reference(*args).detach(), rtol=1e-5, atol=1e-5)


def test_dispatch_modes(monkeypatch):
    _, args, _ = adapter_inputs(5, 32, 8, torch.float32, seed=0)
    ref = adapter_reference(*args)
    assert torch.equal(adapter_forward(*args, mode="off"), ref)
    cpu_args = [a.detach().cpu() for a in args]
    assert torch.equal(adapter_forward(*cpu_args, mode="auto"), adapter_reference(*cpu_args))
    with pytest.raises(ConfigError, match="valid: auto, on, off"):
        adapter_forward(*args, mode="yes")
    # kernels compiled for CUDA cannot take CPU tensors: "on" says how to get the interpreter
    monkeypatch.setattr(fa, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        adapter_forward(*cpu_args, mode="on")


def test_bottleneck_too_large_for_the_kernel_is_refused():
    _, args, _ = adapter_inputs(4, 16, 512, torch.float32, seed=0)
    with pytest.raises(ValueError, match="bottleneck 512"):
        adapter_forward(*args, mode="on")


@pytest.mark.parametrize("method", ["single_adapter", "half_shared_adapter", "hyperformer"])
def test_peft_modules_take_the_fused_path(method):
    """A tiny CLIP-T5 whose adapters run fused matches the same model on the reference path:
    loss and every trainable gradient, with a mixed-task batch for the per-task methods."""
    from tests.helpers import image_batch, tiny

    losses, grads = [], []
    for mode in ("on", "off"):
        cfg, tok, tower, model = tiny("t5", method, seed=1, **{"peft.fused_kernel": mode})
        model.to(DEVICE)
        batch = image_batch(tok, tower, task_ids=torch.tensor([0, 1, 0]))
        batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
        with fa.poison_outputs():
            loss = model(batch)
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


# ---- CUDA: bf16, large M -------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "d", "b"), [(TOKENS, 768, 96), (65_536, 768, 96), (4099, 512, 24)])
def test_gpu_fused_adapter_matches_reference(m, d, b, dtype):
    check_case(m, d, b, dtype)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_activations_with_fp32_weights():
    check_case(TOKENS, 768, 48, torch.bfloat16, w_dtype=torch.float32, lead=(2,))

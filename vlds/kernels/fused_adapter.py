"""Fused Triton kernels for the adapter y = h + Up(gelu_new(Down(h))), forward and backward.

Shapes: x (M, d) tokens, W_down (b, d), b_down (b,), W_up (d, b), b_up (d,); b = bottleneck.
One file of ~400 lines on purpose, as in the Triton tutorials: the kernels, their launch
configuration and the autograd.Function that ties forward to backward read together.

The adapter is memory bound (b = d / 8), so the kernels are organised around bytes, not FLOPs.
Per token at d = 768, b = 96, bf16 (eager writes and rereads every intermediate: ~8.4 KB fwd):

    forward   _through_kernel      read x, write y, write z           2d + 2d + 2b  = 3.3 KB
    backward  _through_kernel      read dy, read z, write dx, dz      2d + 2d + 4b  = 3.5 KB
              _weight_grad_kernel  read x, dy, z, dz                  2d + 2d + 4b  = 3.5 KB

_through_kernel (one program per BLOCK_M rows) is one template for both directions:
    loop 1 over d in BLOCK_D chunks: acc (BLOCK_M, b) += in[:, chunk] @ P[chunk, :]   (fp32)
    epilogue on the fp32 accumulator, the bottleneck never leaves the chip:
        forward:  z = acc + b_down, store z, a = gelu(z)
        backward: dz = acc * gelu'(z)  (z loaded), store dz
    loop 2 over d: out[:, chunk] = in[:, chunk] + a @ Q[:, chunk] (+ b_up)
with (in, P, Q) = (x, W_down^T, W_up^T) forward and (dy, W_up, W_down) backward: dx = dy + dz W_down
is the same residual shape as y = x + a W_up^T. Loop 2 rereads in[:, chunk], which the program
read moments before: an L2 hit, not a second DRAM read.

Saved for backward: z = Down(x) + b_down, the pre-activation, in the activation dtype (2b bytes
per token written, read twice). Recomputing it instead would need x in the first backward
kernel, which otherwise never reads x: 2d bytes per token to save 2b (8x more traffic at r = 8),
plus one more (M x d x b) GEMM. gelu(z), which dW_up needs, is recomputed from z (elementwise).

Weight gradients are reductions over M: dW_down^T = x^T dz, dW_up = dy^T gelu(z), db_up = sum dy,
db_down = sum dz. _weight_grad_kernel tiles them as a split-M GEMM: grid (d / BLOCK_D, S); program
(n, s) owns columns n of d and a contiguous run of row blocks, accumulates both (BLOCK_D, b)
tiles in fp32 registers over its rows, and writes them to an fp32 partial buffer (S, ...); the S
partials are summed in torch (S x 2bd x 4 bytes written and read: ~3 % of the backward's
traffic at M = 65,536, d = 768, b = 96 on an H100, S = 11).
Deterministic (no atomics), unlike an atomic_add reduction, at the cost of that small buffer.
Programs with the same s (same rows) are adjacent in launch order, so z and dz, which every
column tile reads, are shared through L2.

GELU is the tanh form (gelu_new): 0.5 z (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi)(z + 0.044715
z^3); computed with exp (sigmoid), which the CPU interpreter also has.

Matmuls use tensor cores in fp16/bf16 with fp32 accumulation; fp32 inputs use "ieee" dots (no
TF32), matching PyTorch's default for fp32 matmuls. Block sizes are fixed heuristics, not tuned
(no GPU was available when this was written): see `_blocks`.

Tested on CPU with TRITON_INTERPRET=1 (set before triton is imported): tests/test_kernels.py.
Benchmark: python bench/adapter_kernel.py
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vlds.kernels import MAX_BOTTLENECK

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POISON = False  # tests: fill allocated outputs with NaN so an unwritten element fails


@contextlib.contextmanager
def poison_outputs():
    """Allocate every kernel output NaN-filled instead of uninitialised (tests)."""
    global _POISON
    before, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = before


def _new(shape, dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---- kernels ------------------------------------------------------------------------------


# Only triton.language builtins below: its standard-library helpers (tl.sum, tl.sigmoid,
# tl.zeros, tl.cdiv) are @jit functions themselves, built compiled or interpreted once, when
# triton is first imported; without them these kernels also run in the CPU interpreter in a
# process that imported triton before TRITON_INTERPRET=1 was set (transformers imports it).


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))  # exp overflow -> inf -> 0: the right limit


@triton.jit
def _gelu(z):
    # gelu_new(z) = 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z * _sigmoid(2.0 * u)


@triton.jit
def _gelu_grad(z):
    # d/dz [z s(2u)] = s + z * 2 s (1 - s) * du/dz, du/dz = sqrt(2/pi) (1 + 3 * 0.044715 z^2)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    s = _sigmoid(2.0 * u)
    du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    return s + 2.0 * z * s * (1.0 - s) * du


@triton.jit
def _through_kernel(
    in_ptr,  # (M, D) x (forward) | dy (backward); also the residual
    out_ptr,  # (M, D) y | dx
    z_ptr,  # (M, B) pre-activation: written (forward, if SAVE_Z) | read (backward)
    dz_ptr,  # (M, B) backward: written; forward: unused
    p_ptr,  # viewed (D, B): W_down^T | W_up
    q_ptr,  # viewed (B, D): W_up^T | W_down
    bias_p_ptr,  # (B,) b_down (forward only)
    bias_q_ptr,  # (D,) b_up (forward only)
    M,
    D,
    B,
    stride_pd,
    stride_pb,
    stride_qb,
    stride_qd,
    FORWARD: tl.constexpr,
    SAVE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    row_off = rows.to(tl.int64) * D  # M * D may pass 2^31
    cols_b = tl.arange(0, BLOCK_B)
    b_ok = cols_b < B

    # loop 1: acc = in @ P, the bottleneck, in fp32 registers
    acc = tl.full((BLOCK_M, BLOCK_B), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_ok = cols < D
        x = tl.load(
            in_ptr + row_off[:, None] + cols[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        p = tl.load(
            p_ptr + cols[:, None] * stride_pd + cols_b[None, :] * stride_pb,
            mask=d_ok[:, None] & b_ok[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_B)
        acc = tl.dot(x, p, acc, input_precision=PRECISION)

    # epilogue on the fp32 accumulator; padded bottleneck columns stay exactly 0
    z_off = rows.to(tl.int64)[:, None] * B + cols_b[None, :]
    z_mask = row_ok[:, None] & b_ok[None, :]
    if FORWARD:
        z = acc + tl.load(bias_p_ptr + cols_b, mask=b_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE_Z:
            tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=z_mask)
        mid = _gelu(z)  # a = gelu(z)
    else:
        z = tl.load(z_ptr + z_off, mask=z_mask, other=0.0).to(tl.float32)
        mid = acc * _gelu_grad(z)  # dz = (dy @ W_up) * gelu'(z)
        tl.store(dz_ptr + z_off, mid.to(dz_ptr.dtype.element_ty), mask=z_mask)
    mid = mid.to(in_ptr.dtype.element_ty)  # the second GEMM's operand, as eager rounds it

    # loop 2: out = in + mid @ Q (+ b_up)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_ok = cols < D
        mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(
            q_ptr + cols_b[:, None] * stride_qb + cols[None, :] * stride_qd,
            mask=b_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_B, BLOCK_D)
        y = tl.dot(mid, q, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D) fp32
        y += tl.load(in_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )  # residual: reread from L2
        if FORWARD:
            y += tl.load(bias_q_ptr + cols, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row_off[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask)


@triton.jit
def _weight_grad_kernel(
    x_ptr,  # (M, D)
    dy_ptr,  # (M, D)
    z_ptr,  # (M, B)
    dz_ptr,  # (M, B)
    dwd_ptr,  # (S, B, D) fp32 partials of dW_down
    dwu_ptr,  # (S, D, B) fp32 partials of dW_up
    dbd_ptr,  # (S, B) fp32 partials of db_down (written by column tile 0)
    dbu_ptr,  # (S, D) fp32 partials of db_up
    M,
    D,
    B,
    blocks_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)  # fastest: the programs sharing rows (and z, dz) run together
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < D
    cols_b = tl.arange(0, BLOCK_B)
    b_ok = cols_b < B

    acc_wd = tl.full((BLOCK_D, BLOCK_B), 0.0, tl.float32)  # dW_down^T tile: x^T dz
    acc_wu = tl.full((BLOCK_D, BLOCK_B), 0.0, tl.float32)  # dW_up tile: dy^T gelu(z)
    # Column sums (the bias gradients) as dots with a ones tile: 16 identical rows (tl.dot's
    # minimum), row 0 stored. A small extra tensor-core op instead of a cross-warp reduction
    # every iteration; and the interpreter runs it as one numpy matmul.
    acc_bu = tl.full((16, BLOCK_D), 0.0, tl.float32)
    acc_bd = tl.full((16, BLOCK_B), 0.0, tl.float32)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, (M + BLOCK_M - 1) // BLOCK_M)
    for mb in range(first, last):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        md = row_ok[:, None] & d_ok[None, :]
        mb_mask = row_ok[:, None] & b_ok[None, :]
        d_off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        b_off = rows.to(tl.int64)[:, None] * B + cols_b[None, :]
        x = tl.load(x_ptr + d_off, mask=md, other=0.0)  # (BLOCK_M, BLOCK_D)
        dy = tl.load(dy_ptr + d_off, mask=md, other=0.0)
        dz = tl.load(dz_ptr + b_off, mask=mb_mask, other=0.0)  # (BLOCK_M, BLOCK_B)
        z = tl.load(z_ptr + b_off, mask=mb_mask, other=0.0).to(tl.float32)
        a = _gelu(z).to(dy.dtype)  # recomputed: masked rows give gelu(0) = 0
        ones = tl.full((16, BLOCK_M), 1.0, dy.dtype)
        acc_wd = tl.dot(tl.trans(x), dz, acc_wd, input_precision=PRECISION)
        acc_wu = tl.dot(tl.trans(dy), a, acc_wu, input_precision=PRECISION)
        acc_bu = tl.dot(ones, dy, acc_bu, input_precision=PRECISION)  # (16, BLOCK_D)
        acc_bd = tl.dot(ones, dz, acc_bd, input_precision=PRECISION)  # (16, BLOCK_B)

    tile = d_ok[:, None] & b_ok[None, :]
    dwd = dwd_ptr + pid_s * B * D + cols_b[None, :] * D + cols[:, None]  # stored as (B, D)
    tl.store(dwd, acc_wd, mask=tile)
    dwu = dwu_ptr + pid_s * D * B + cols[:, None] * B + cols_b[None, :]
    tl.store(dwu, acc_wu, mask=tile)
    row0 = (tl.arange(0, 16) == 0)[:, None]
    zero = tl.arange(0, 16)[:, None] * 0  # all 16 rows address row 0; only row 0 is stored
    tl.store(dbu_ptr + pid_s * D + zero + cols[None, :], acc_bu, mask=row0 & d_ok[None, :])
    dbd_mask = row0 & b_ok[None, :] & (pid_d == 0)
    tl.store(dbd_ptr + pid_s * B + zero + cols_b[None, :], acc_bd, mask=dbd_mask)


# ---- launch configuration ----------------------------------------------------------------


def interpreting() -> bool:
    """True when the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_through_kernel, InterpretedFunction)


def _blocks(bottleneck: int, dtype: torch.dtype) -> dict:
    """Block sizes: heuristics, not measured on a GPU (none was available).

    BLOCK_B covers the whole bottleneck (padded to a power of two, >= 16 for tl.dot), so one
    program holds a (BLOCK_M, BLOCK_B) fp32 accumulator: 64 x 128 x 4 B = 32 KB at b = 96.
    Compiled for sm_90 on a CPU (triton + ptxas need no GPU), 16-bit kernels with 8 warps are
    spill-free at b = 24, 48 and 96 (4 warps spill ~1 KB per thread at b = 96). fp32 (not the
    training path) has no 16-bit tensor-core dots and twice the bytes per tile: halved BLOCK_M
    and BLOCK_D and 2 stages fit (the weight-gradient kernel still spills ~0.5 KB at b = 96).
    """
    block_b = max(16, triton.next_power_of_2(bottleneck))
    wide = dtype == torch.float32
    return {
        "BLOCK_M": 32 if wide else 64,
        "BLOCK_D": 32 if wide else 64,
        "BLOCK_B": block_b,
        "num_warps": 8,
        "num_stages": 2 if wide else 3,
    }


def _config(bottleneck: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The GPU tiling; in the CPU interpreter, which has no registers to spare, the 16-bit one
    for every dtype (4x fewer interpreted steps for fp32; tests run the fp32 tiling too)."""
    return _blocks(bottleneck, dtype if device.type == "cuda" else torch.bfloat16)


def _splits(m_blocks: int, d_blocks: int, device: torch.device) -> tuple[int, int]:
    """(S, row blocks per split) for the weight-gradient grid: one program per SM on a GPU (one
    8-warp, ~250-register program fills an SM; more splits only grow the partial buffer); a few
    splits in the interpreter, enough to test the partial-sum path."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4 * d_blocks
    splits = max(1, min(m_blocks, triton.cdiv(target, d_blocks)))
    per = triton.cdiv(m_blocks, splits)
    return triton.cdiv(m_blocks, per), per  # no empty splits


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


# ---- autograd -----------------------------------------------------------------------------


class FusedAdapterFunction(torch.autograd.Function):
    """y = x + gelu_new(x W_down^T + b_down) W_up^T + b_up for x (M, d) contiguous, all in one
    dtype. Saves x, the weights and z (M, b) for backward."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, save_z: bool):
        M, D = x.shape
        B = w_down.shape[0]
        cfg = _config(B, x.dtype, x.device)
        y = _new((M, D), x.dtype, x.device)
        z = _new((M, B), x.dtype, x.device) if save_z else y  # y: an unused placeholder
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        # P = W_down^T viewed (D, B); Q = W_up^T viewed (B, D)
        _through_kernel[grid](
            x,
            y,
            z,
            z,
            w_down,
            w_up,
            b_down,
            b_up,
            M,
            D,
            B,
            w_down.stride(1),
            w_down.stride(0),
            w_up.stride(1),
            w_up.stride(0),
            FORWARD=True,
            SAVE_Z=save_z,
            PRECISION=_precision(x.dtype),
            **cfg,
        )
        if save_z:
            ctx.save_for_backward(x, w_down, w_up, z)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_down, w_up, z = ctx.saved_tensors
        dy = dy.contiguous()
        M, D = x.shape
        B = w_down.shape[0]
        cfg = _config(B, x.dtype, x.device)
        prec = _precision(x.dtype)
        dx = _new((M, D), x.dtype, x.device)
        dz = _new((M, B), x.dtype, x.device)
        # dz = (dy @ W_up) * gelu'(z); dx = dy + dz @ W_down. P = W_up (D, B), Q = W_down (B, D)
        _through_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            dy,
            dx,
            z,
            dz,
            w_up,
            w_down,
            dz,
            dz,
            M,
            D,
            B,
            w_up.stride(0),
            w_up.stride(1),
            w_down.stride(0),
            w_down.stride(1),
            FORWARD=False,
            SAVE_Z=False,
            PRECISION=prec,
            **cfg,
        )
        if not any(ctx.needs_input_grad[1:5]):
            return dx, None, None, None, None, None

        d_blocks = triton.cdiv(D, cfg["BLOCK_D"])
        splits, per = _splits(triton.cdiv(M, cfg["BLOCK_M"]), d_blocks, x.device)
        f32 = torch.float32
        part_wd = _new((splits, B, D), f32, x.device)
        part_wu = _new((splits, D, B), f32, x.device)
        part_bd = _new((splits, B), f32, x.device)
        part_bu = _new((splits, D), f32, x.device)
        _weight_grad_kernel[(d_blocks, splits)](
            x,
            dy,
            z,
            dz,
            part_wd,
            part_wu,
            part_bd,
            part_bu,
            M,
            D,
            B,
            per,
            PRECISION=prec,
            **cfg,
        )
        # fp32 sums of the S partials, then the parameters' dtype
        return (
            dx if ctx.needs_input_grad[0] else None,
            part_wd.sum(0).to(w_down.dtype),
            part_bd.sum(0).to(w_down.dtype),
            part_wu.sum(0).to(w_up.dtype),
            part_bu.sum(0).to(w_up.dtype),
            None,
        )


def fused_adapter(
    h: torch.Tensor,  # (..., d)
    w_down: torch.Tensor,  # (b, d)
    b_down: torch.Tensor | None,  # (b,)
    w_up: torch.Tensor,  # (d, b)
    b_up: torch.Tensor | None,  # (d,)
) -> torch.Tensor:
    """The fused adapter on any leading shape; weights are cast to h's dtype (autograd casts
    their gradients back), as the reference does."""
    d = h.shape[-1]
    b = w_down.shape[0]
    if h.dtype not in DTYPES:
        raise TypeError(f"fused adapter: dtype {h.dtype} not supported; use fp32, fp16 or bf16")
    if w_down.shape != (b, d) or w_up.shape != (d, b):
        raise ValueError(
            f"fused adapter: W_down {tuple(w_down.shape)} and W_up {tuple(w_up.shape)} do not "
            f"fit hidden size {d}: expected ({b}, {d}) and ({d}, {b})"
        )
    if b > MAX_BOTTLENECK:
        raise ValueError(
            f"fused adapter: bottleneck {b} > {MAX_BOTTLENECK} (it is held in registers); "
            "use peft.fused_kernel=auto or off, or a larger reduction factor"
        )
    dtype = h.dtype
    wd, wu = w_down.to(dtype), w_up.to(dtype)
    bd = torch.zeros(b, dtype=dtype, device=h.device) if b_down is None else b_down.to(dtype)
    bu = torch.zeros(d, dtype=dtype, device=h.device) if b_up is None else b_up.to(dtype)
    x = h.reshape(-1, d).contiguous()  # (M, d)
    if x.shape[0] == 0:
        return h.clone()
    save_z = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, wd, bd, wu, bu)
    )  # inside Function.forward grad mode is off, so decide here
    y = FusedAdapterFunction.apply(x, wd, bd, wu, bu, save_z)
    return y.view(h.shape)

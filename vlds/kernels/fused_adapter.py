"""Fused Triton kernels for the adapter y = h + Up(gelu_new(Down(h))), forward and backward.

Shapes: x (M, d) tokens, W_down (b, d), b_down (b,), W_up (d, b), b_up (d,); b = bottleneck.
One file on purpose, as in the Triton tutorials: the kernels, their launch configuration and the
operators (torch.library custom ops with their autograd formula) that launch them read together.

The adapter is memory bound (b = d / 8), so the kernels are organised around bytes, not FLOPs.
Per token at d = 768, b = 96, bf16 (eager writes and rereads every intermediate: ~8.4 KB fwd):

    forward   _through_kernel      read x, write y, write z           2d + 2d + 2b  = 3.3 KB
    backward  _through_kernel      read dy, read z, write dx, dz      2d + 2d + 4b  = 3.5 KB
              _weight_grad_kernel  read x, dy, z, dz                  2d + 2d + 4b  = 3.5 KB

_through_kernel (one program per BLOCK_M rows) is one template for both directions:
    loop 1 over d in BLOCK_D chunks: acc (BLOCK_M, b) += in[:, chunk] @ P[chunk, :]   (fp32)
    epilogue on the fp32 accumulator, the bottleneck never leaves the chip (b is held as one or two
    power-of-two pieces, 96 = 64 + 32: _pieces; each piece a _piece_* helper):
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
traffic at M = 65,536, d = 768, b = 96 on an H100, S = 11). S is the largest count with
d_blocks x S <= the SM count: one wave of programs.
Deterministic (no atomics), unlike an atomic_add reduction, at the cost of that small buffer.
Programs with the same s (same rows) are adjacent in launch order, so z and dz, which every
column tile reads, are shared through L2.

GELU is the tanh form (gelu_new): 0.5 z (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi)(z + 0.044715
z^3); computed with exp (sigmoid), which the CPU interpreter also has.

Matmuls use tensor cores in fp16/bf16 with fp32 accumulation; fp32 inputs use "ieee" dots (no
TF32), matching PyTorch's default for fp32 matmuls. On a GPU the block sizes, warps and stages
are autotuned per (d, b, dtypes) over a short list (_THROUGH_CONFIGS, _GRAD_CONFIGS), the first
being the heuristic of `_blocks`, which the interpreter uses; no GPU has timed them yet.

Tested on CPU with TRITON_INTERPRET=1 (set before triton is imported) and compiled for sm_90
without a GPU (compile_for_gpu): tests/test_kernels.py. Benchmark: python bench/adapter_kernel.py
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
def _piece_in(x, acc, p_ptr, cols, d_ok, B, stride_pd, stride_pb, B0: tl.constexpr,
              BB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """acc += x @ P[cols, B0:B0 + BB]: one bottleneck piece of loop 1."""
    cb = B0 + tl.arange(0, BB)
    p = tl.load(
        p_ptr + cols[:, None] * stride_pd + cb[None, :] * stride_pb,
        mask=d_ok[:, None] & (cb < B)[None, :],
        other=0.0,
    )  # (BLOCK_D, BB)
    return tl.dot(x, p, acc, input_precision=PRECISION)


@triton.jit
def _piece_mid(acc, rows, row_ok, z_ptr, dz_ptr, bias_p_ptr, B, B0: tl.constexpr,
               BB: tl.constexpr, FORWARD: tl.constexpr, SAVE_Z: tl.constexpr):  # fmt: skip
    """The epilogue of one piece on its fp32 accumulator (padded columns stay exactly 0):
    forward a = gelu(z), z = acc + b_down (stored if SAVE_Z); backward dz = acc * gelu'(z)."""
    cb = B0 + tl.arange(0, BB)
    b_ok = cb < B
    z_off = rows.to(tl.int64)[:, None] * B + cb[None, :]
    z_mask = row_ok[:, None] & b_ok[None, :]
    if FORWARD:
        z = acc + tl.load(bias_p_ptr + cb, mask=b_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE_Z:
            tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=z_mask)
        mid = _gelu(z)
    else:
        z = tl.load(z_ptr + z_off, mask=z_mask, other=0.0).to(tl.float32)
        mid = acc * _gelu_grad(z)
        tl.store(dz_ptr + z_off, mid.to(dz_ptr.dtype.element_ty), mask=z_mask)
    return mid


@triton.jit
def _piece_out(mid, q_ptr, cols, d_ok, B, stride_qb, stride_qd, B0: tl.constexpr,
               BB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """mid @ Q[B0:B0 + BB, cols]: one piece's share of loop 2, (BLOCK_M, BLOCK_D) fp32."""
    cb = B0 + tl.arange(0, BB)
    q = tl.load(
        q_ptr + cb[:, None] * stride_qb + cols[None, :] * stride_qd,
        mask=(cb < B)[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BB, BLOCK_D)
    return tl.dot(mid, q, input_precision=PRECISION)


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
    BLOCK_B: tl.constexpr,  # the bottleneck's first piece (a power of two)
    BLOCK_B2: tl.constexpr,  # its second piece after BLOCK_B, or 0 (see _pieces)
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    row_off = rows.to(tl.int64) * D  # M * D may pass 2^31

    # loop 1: acc = in @ P, the bottleneck, in fp32 registers (one or two pieces)
    acc = tl.full((BLOCK_M, BLOCK_B), 0.0, tl.float32)
    if BLOCK_B2 > 0:
        acc2 = tl.full((BLOCK_M, BLOCK_B2), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_ok = cols < D
        x = tl.load(
            in_ptr + row_off[:, None] + cols[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D), read once for both pieces
        acc = _piece_in(x, acc, p_ptr, cols, d_ok, B, stride_pd, stride_pb, 0, BLOCK_B, PRECISION)
        if BLOCK_B2 > 0:
            acc2 = _piece_in(x, acc2, p_ptr, cols, d_ok, B, stride_pd, stride_pb, BLOCK_B,
                             BLOCK_B2, PRECISION)  # fmt: skip

    # epilogue on the accumulators; the second GEMM's operand rounded as eager rounds it
    mid = _piece_mid(acc, rows, row_ok, z_ptr, dz_ptr, bias_p_ptr, B, 0, BLOCK_B, FORWARD, SAVE_Z)
    mid = mid.to(in_ptr.dtype.element_ty)
    if BLOCK_B2 > 0:
        mid2 = _piece_mid(acc2, rows, row_ok, z_ptr, dz_ptr, bias_p_ptr, B, BLOCK_B, BLOCK_B2,
                          FORWARD, SAVE_Z).to(in_ptr.dtype.element_ty)  # fmt: skip

    # loop 2: out = in + mid @ Q (+ b_up)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_ok = cols < D
        mask = row_ok[:, None] & d_ok[None, :]
        y = _piece_out(mid, q_ptr, cols, d_ok, B, stride_qb, stride_qd, 0, BLOCK_B, PRECISION)
        if BLOCK_B2 > 0:
            y += _piece_out(mid2, q_ptr, cols, d_ok, B, stride_qb, stride_qd, BLOCK_B, BLOCK_B2,
                            PRECISION)  # fmt: skip
        y += tl.load(in_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )  # residual: reread from L2
        if FORWARD:
            y += tl.load(bias_q_ptr + cols, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row_off[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask)


@triton.jit
def _piece_grads(x, dy, ones, rows, row_ok, z_ptr, dz_ptr, B, acc_wd, acc_wu, acc_bd,
                 B0: tl.constexpr, BB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One bottleneck piece's dW_down^T += x^T dz, dW_up += dy^T gelu(z), db_down += sum dz."""
    cb = B0 + tl.arange(0, BB)
    mask = row_ok[:, None] & (cb < B)[None, :]
    b_off = rows.to(tl.int64)[:, None] * B + cb[None, :]
    dz = tl.load(dz_ptr + b_off, mask=mask, other=0.0)  # (BLOCK_M, BB)
    z = tl.load(z_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    a = _gelu(z).to(dy.dtype)  # recomputed: masked rows give gelu(0) = 0
    acc_wd = tl.dot(tl.trans(x), dz, acc_wd, input_precision=PRECISION)
    acc_wu = tl.dot(tl.trans(dy), a, acc_wu, input_precision=PRECISION)
    acc_bd = tl.dot(ones, dz, acc_bd, input_precision=PRECISION)
    return acc_wd, acc_wu, acc_bd


@triton.jit
def _piece_store(acc_wd, acc_wu, acc_bd, dwd_ptr, dwu_ptr, dbd_ptr, cols, d_ok, pid_d, pid_s,
                 D, B, B0: tl.constexpr, BB: tl.constexpr):  # fmt: skip
    """One piece's partials: dW_down stored (B, D), dW_up (D, B), db_down by column tile 0."""
    cb = B0 + tl.arange(0, BB)
    b_ok = cb < B
    tile = d_ok[:, None] & b_ok[None, :]
    tl.store(dwd_ptr + pid_s * B * D + cb[None, :] * D + cols[:, None], acc_wd, mask=tile)
    tl.store(dwu_ptr + pid_s * D * B + cols[:, None] * B + cb[None, :], acc_wu, mask=tile)
    _store_row0(dbd_ptr + pid_s * B, acc_bd, cb, b_ok & (pid_d == 0))


@triton.jit
def _store_row0(ptr, acc, cols, mask):
    """Row 0 of a (16, N) column-sum accumulator (its rows are equal) to ptr[cols] where mask."""
    row0 = (tl.arange(0, 16) == 0)[:, None]
    zero = tl.arange(0, 16)[:, None] * 0  # all 16 rows address row 0; only row 0 is stored
    tl.store(ptr + zero + cols[None, :], acc, mask=row0 & mask[None, :])


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
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_B2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)  # fastest: the programs sharing rows (and z, dz) run together
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols < D

    acc_wd = tl.full((BLOCK_D, BLOCK_B), 0.0, tl.float32)  # dW_down^T tile: x^T dz
    acc_wu = tl.full((BLOCK_D, BLOCK_B), 0.0, tl.float32)  # dW_up tile: dy^T gelu(z)
    # Column sums (the bias gradients) as dots with a ones tile: 16 identical rows (tl.dot's
    # minimum), row 0 stored. A small extra tensor-core op instead of a cross-warp reduction
    # every iteration; and the interpreter runs it as one numpy matmul.
    acc_bu = tl.full((16, BLOCK_D), 0.0, tl.float32)
    acc_bd = tl.full((16, BLOCK_B), 0.0, tl.float32)
    if BLOCK_B2 > 0:
        acc_wd2 = tl.full((BLOCK_D, BLOCK_B2), 0.0, tl.float32)
        acc_wu2 = tl.full((BLOCK_D, BLOCK_B2), 0.0, tl.float32)
        acc_bd2 = tl.full((16, BLOCK_B2), 0.0, tl.float32)
    # the S = num_programs(1) splits share the row blocks evenly; a split past the end stores
    # zeros (BLOCK_M is autotuned, so the host cannot size S to the row blocks exactly)
    m_blocks = (M + BLOCK_M - 1) // BLOCK_M
    per = (m_blocks + tl.num_programs(1) - 1) // tl.num_programs(1)
    first = pid_s * per
    last = tl.minimum(first + per, m_blocks)
    for mb in range(first, last):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        md = row_ok[:, None] & d_ok[None, :]
        d_off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + d_off, mask=md, other=0.0)  # (BLOCK_M, BLOCK_D)
        dy = tl.load(dy_ptr + d_off, mask=md, other=0.0)
        # a ones tile in dy's dtype (built in fp32: the interpreter has no bf16 constants)
        ones = tl.full((16, BLOCK_M), 1.0, tl.float32).to(dy.dtype)
        acc_bu = tl.dot(ones, dy, acc_bu, input_precision=PRECISION)  # (16, BLOCK_D)
        acc_wd, acc_wu, acc_bd = _piece_grads(x, dy, ones, rows, row_ok, z_ptr, dz_ptr, B, acc_wd,
                                              acc_wu, acc_bd, 0, BLOCK_B, PRECISION)  # fmt: skip
        if BLOCK_B2 > 0:
            acc_wd2, acc_wu2, acc_bd2 = _piece_grads(
                x, dy, ones, rows, row_ok, z_ptr, dz_ptr, B, acc_wd2, acc_wu2, acc_bd2, BLOCK_B,
                BLOCK_B2, PRECISION,
            )  # fmt: skip

    _piece_store(acc_wd, acc_wu, acc_bd, dwd_ptr, dwu_ptr, dbd_ptr, cols, d_ok, pid_d, pid_s,
                 D, B, 0, BLOCK_B)  # fmt: skip
    if BLOCK_B2 > 0:
        _piece_store(acc_wd2, acc_wu2, acc_bd2, dwd_ptr, dwu_ptr, dbd_ptr, cols, d_ok, pid_d,
                     pid_s, D, B, BLOCK_B, BLOCK_B2)  # fmt: skip
    _store_row0(dbu_ptr + pid_s * D, acc_bu, cols, d_ok)


# ---- launch configuration ----------------------------------------------------------------

# triton decides interpreted vs compiled when a kernel is decorated (above); so does this.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# The interpreter tiles every dtype as 16-bit (4x fewer interpreted steps for fp32 than its own
# tiling); tests set float32 to run the GPU's fp32 tiling too.
INTERPRETER_TILING = torch.bfloat16


def interpreting() -> bool:
    """True when the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRETED


def _blocks(bottleneck: int, dtype: torch.dtype) -> dict:
    """The untuned tiling: the interpreter's, and the first of the autotuned configs on a GPU.

    BLOCK_B (+ BLOCK_B2) cover the whole bottleneck (_pieces), so one program holds a
    (BLOCK_M, b) fp32 accumulator: 64 x 96 x 4 B = 24 KB at b = 96. Compiled for sm_90 on a
    CPU (triton + ptxas need no GPU), before the bottleneck was split in pieces, 16-bit kernels
    with 8 warps were spill-free at b = 24, 48 and 96 (4 warps spilled ~1 KB per thread at
    b = 96). fp32 (not the training path) has no 16-bit tensor-core dots and twice the bytes per
    tile: halved BLOCK_M and BLOCK_D and 2 stages fit.
    """
    wide = dtype == torch.float32
    return {
        "BLOCK_M": 32 if wide else 64,
        "BLOCK_D": 32 if wide else 64,
        **_pieces(bottleneck),
        "num_warps": 8,
        "num_stages": 2 if wide else 3,
    }


def _pieces(bottleneck: int) -> dict:
    """The bottleneck's register tiles: tl.dot needs power-of-two sizes >= 16, so b = 96 is one
    64-wide piece and one 32-wide (no padding) rather than 128 (a third of it zeros, computed
    and held in registers). Two pieces when they cover b tighter than one power of two: b = 96,
    48, 80, 160, 192 exactly (b = 16 (2^i + 2^j)); otherwise one padded piece (b = 24 -> 32).
    {"BLOCK_B": first piece, "BLOCK_B2": second piece or 0}."""
    whole = max(16, triton.next_power_of_2(bottleneck))
    first = max(16, 1 << (bottleneck.bit_length() - 1))
    second = max(16, triton.next_power_of_2(bottleneck - first)) if bottleneck > first else 0
    if second == 0 or first + second >= whole:
        return {"BLOCK_B": whole, "BLOCK_B2": 0}
    return {"BLOCK_B": first, "BLOCK_B2": second}


def _grad_block_d(dtype: torch.dtype) -> int:
    """The weight-gradient kernel's column tile: fixed, not tuned, so that the host knows the
    column tiles and can size the split count to one wave (_splits)."""
    return _blocks(16, dtype)["BLOCK_D"]


# Autotuned on a GPU, keyed on (D, B) and, as triton adds them, the tensors' dtypes. Larger
# BLOCK_M rereads the weights (from L2) for fewer rows: at BLOCK_M 64 and d 768, b 96, bf16 both
# weight matrices are ~4.6 KB per token of L2 reads, at 128 half that, at the cost of registers.
_THROUGH_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_D": d}, num_warps=w, num_stages=st)
    for m, d, w, st in [
        (64, 64, 8, 3),  # _blocks' 16-bit choice first
        (128, 64, 8, 3),
        (128, 32, 8, 3),
        (64, 128, 8, 2),
        (128, 64, 8, 2),
        (64, 64, 4, 3),
        (32, 32, 8, 2),  # _blocks' fp32 choice
        (32, 64, 4, 2),
    ]
]
# 8 warps only: on an H200 (triton 3.6, torch 2.11, 2026-11-30) the weight-gradient kernel at
# BLOCK_M 64 with 4 warps returned a wrong dW_up at d 768, b 96 in bf16 (max abs error 176 vs
# max |ref| 169), while every 8-warp config matched (BLOCK_M 32 with 4 warps did too, and went
# with its family); and the autotuner, benchmarking all six configs, hit an illegal memory
# access (bench/RESULTS.md, "First run on a GPU").
_GRAD_CONFIGS = [
    triton.Config({"BLOCK_M": m}, num_warps=8, num_stages=st)
    for m, st in [(64, 3), (128, 3), (128, 2), (32, 2)]
]


def _fits(configs, named_args, **kwargs):
    """Early prune: no (BLOCK_M x b) fp32 accumulator over 128 x 128 (registers)."""
    block_b = kwargs["BLOCK_B"] + kwargs["BLOCK_B2"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_b <= 128 * 128]
    return kept or configs[:1]


if INTERPRETED:  # the interpreter has nothing to time: one config, passed by the caller
    _through, _weight_grad = _through_kernel, _weight_grad_kernel
else:
    _prune = {"early_config_prune": _fits}
    # forward, training forward and backward are tuned apart (one kernel, three programs)
    _through = triton.autotune(
        _THROUGH_CONFIGS, key=["D", "B", "FORWARD", "SAVE_Z"], prune_configs_by=_prune
    )(_through_kernel)
    _weight_grad = triton.autotune(_GRAD_CONFIGS, key=["D", "B"], prune_configs_by=_prune)(
        _weight_grad_kernel
    )


def _launch_cfg(bottleneck: int, dtype: torch.dtype, kernel: str) -> dict:
    """The keyword arguments of a launch: on a GPU only what is not tuned (the bottleneck's
    pieces; the weight gradient's BLOCK_D); in the interpreter the whole untuned tiling of
    INTERPRETER_TILING."""
    if INTERPRETED:
        return _blocks(bottleneck, INTERPRETER_TILING)  # its BLOCK_D is _grad_block_d's
    cfg = _pieces(bottleneck)
    if kernel == "grad":
        cfg["BLOCK_D"] = _grad_block_d(dtype)
    return cfg


def _rows_grid(M: int, cfg: dict):
    if "BLOCK_M" in cfg:
        return (triton.cdiv(M, cfg["BLOCK_M"]),)
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def _splits(M: int, d_blocks: int, device: torch.device) -> int:
    """S, the weight-gradient grid's row splits: on a GPU as many as fill exactly one wave,
    d_blocks x S <= the SM count (one 8-warp, ~250-register program fills an SM: a second wave
    would run a handful of programs on an idle GPU); in the interpreter a few, enough to test the
    partial sums. Never more than the row blocks at the smallest tuned BLOCK_M."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = sms // d_blocks
    else:
        splits = 4
    return max(1, min(splits, triton.cdiv(M, 32)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (triton launches on the current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---- operators ------------------------------------------------------------------------------
# Registered with torch.library.custom_op, so torch.compile keeps them as single nodes of one
# graph (no graph break) and DeepSpeed / autograd see ordinary operators. custom_op rather than
# triton_op: inductor would lower a triton_op to its own kernel calls, which on CPU tensors (the
# interpreter, where the tests run) it cannot do; an opaque custom op runs the same everywhere.


@torch.library.custom_op("vlds::adapter_forward", mutates_args=())
def adapter_forward_op(
    x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
    b_up: torch.Tensor, save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, z): y = x + gelu_new(x W_down^T + b_down) W_up^T + b_up for x (M, d) contiguous, all
    in one dtype; z (M, b) the pre-activation if save_z, else an empty (0, b)."""
    M, D = x.shape
    B = w_down.shape[0]
    cfg = _launch_cfg(B, x.dtype, "through")
    y = _new((M, D), x.dtype, x.device)
    z = _new((M if save_z else 0, B), x.dtype, x.device)
    with _on_device(x):
        # P = W_down^T viewed (D, B); Q = W_up^T viewed (B, D)
        _through[_rows_grid(M, cfg)](
            x, y, z if save_z else y, z if save_z else y, w_down, w_up, b_down, b_up, M, D, B,
            w_down.stride(1), w_down.stride(0), w_up.stride(1), w_up.stride(0),
            FORWARD=True, SAVE_Z=save_z, PRECISION=_precision(x.dtype), **cfg,
        )  # fmt: skip
    return y, z


@adapter_forward_op.register_fake
def _(x, w_down, b_down, w_up, b_up, save_z):
    return torch.empty_like(x), x.new_empty((x.shape[0] if save_z else 0, w_down.shape[0]))


@torch.library.custom_op("vlds::adapter_backward", mutates_args=())
def adapter_backward_op(
    dy: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
    z: torch.Tensor, weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dW_down, db_down, dW_up, db_up); the four weight gradients are empty unless
    weight_grads. Weight gradients are summed in fp32 and returned in the weights' dtype."""
    dy = dy.contiguous()
    M, D = x.shape
    B = w_down.shape[0]
    prec = _precision(x.dtype)
    cfg = _launch_cfg(B, x.dtype, "through")
    dx = _new((M, D), x.dtype, x.device)
    dz = _new((M, B), x.dtype, x.device)
    with _on_device(x):
        # dz = (dy @ W_up) * gelu'(z); dx = dy + dz @ W_down. P = W_up (D, B), Q = W_down (B, D)
        _through[_rows_grid(M, cfg)](
            dy, dx, z, dz, w_up, w_down, dz, dz, M, D, B,
            w_up.stride(0), w_up.stride(1), w_down.stride(0), w_down.stride(1),
            FORWARD=False, SAVE_Z=False, PRECISION=prec, **cfg,
        )  # fmt: skip
        if not weight_grads:
            empty = x.new_empty(0)
            return dx, empty, empty.clone(), empty.clone(), empty.clone()
        gcfg = _launch_cfg(B, x.dtype, "grad")
        d_blocks = triton.cdiv(D, gcfg["BLOCK_D"])
        splits = _splits(M, d_blocks, x.device)
        f32 = torch.float32
        part_wd = _new((splits, B, D), f32, x.device)
        part_wu = _new((splits, D, B), f32, x.device)
        part_bd = _new((splits, B), f32, x.device)
        part_bu = _new((splits, D), f32, x.device)
        _weight_grad[(d_blocks, splits)](
            x, dy, z, dz, part_wd, part_wu, part_bd, part_bu, M, D, B, PRECISION=prec, **gcfg
        )
    # fp32 sums of the S partials, then the parameters' dtype
    return (
        dx,
        part_wd.sum(0).to(w_down.dtype),
        part_bd.sum(0).to(w_down.dtype),
        part_wu.sum(0).to(w_up.dtype),
        part_bu.sum(0).to(w_up.dtype),
    )


@adapter_backward_op.register_fake
def _(dy, x, w_down, w_up, z, weight_grads):
    if not weight_grads:
        empty = x.new_empty(0)
        return torch.empty_like(x), empty, empty.clone(), empty.clone(), empty.clone()
    b, d = w_down.shape
    return (
        torch.empty_like(x),
        w_down.new_empty((b, d)),
        w_down.new_empty((b,)),
        w_up.new_empty((d, b)),
        w_up.new_empty((d,)),
    )


def _setup_context(ctx, inputs, output):
    x, w_down, _, w_up, _, _ = inputs
    ctx.save_for_backward(x, w_down, w_up, output[1])


def _backward(ctx, dy, _dz):
    x, w_down, w_up, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    weights = any(need[1:5])
    dx, dwd, dbd, dwu, dbu = adapter_backward_op(dy, x, w_down, w_up, z, weights)
    if not weights:
        dwd = dbd = dwu = dbu = None
    return (dx if need[0] else None), dwd, dbd, dwu, dbu, None


adapter_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    save_z = torch.is_grad_enabled() and any(t.requires_grad for t in (x, wd, bd, wu, bu))
    y, _ = adapter_forward_op(x, wd, bd, wu, bu, save_z)
    return y.view(h.shape)


# ---- ahead-of-time compilation check ---------------------------------------------------------


def compile_for_gpu(arch: int = 90, dtypes=DTYPES, bottleneck: int = 96, every_config=False):
    """Compile every kernel variant for a CUDA target without a GPU (triton and its bundled
    ptxas need none): [(kernel, dtype, config, shared memory bytes)]. Catches what only a GPU
    compile would (a construct the backend rejects in some dtype, a tile too large for shared
    memory) on a CPU machine. Needs the kernels built compiled (TRITON_INTERPRET unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_for_gpu: the kernels were built for the interpreter")
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    variants = [
        ("through_fwd", _through_kernel, {"FORWARD": True, "SAVE_Z": True}, _THROUGH_CONFIGS),
        ("through_bwd", _through_kernel, {"FORWARD": False, "SAVE_Z": False}, _THROUGH_CONFIGS),
        ("weight_grad", _weight_grad_kernel, {}, _GRAD_CONFIGS),
    ]
    out = []
    for dtype in dtypes:
        for name, kernel, flags, configs in variants:
            default = _blocks(bottleneck, dtype)  # its BLOCK_D is _grad_block_d's
            tiles = [default] if not every_config else [
                {**default, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                for c in configs
            ]  # fmt: skip
            for tile in tiles:
                consts = {**flags, "PRECISION": _precision(dtype)}
                consts.update({k: v for k, v in tile.items() if k.startswith("BLOCK")})
                sig = {}
                for arg in kernel.arg_names:
                    if arg in consts:
                        sig[arg] = "constexpr"
                    elif arg.endswith("_ptr"):
                        fp32_part = arg.startswith(("dwd", "dwu", "dbd", "dbu"))
                        sig[arg] = "*fp32" if fp32_part else f"*{names[dtype]}"
                    else:
                        sig[arg] = "i32"
                index = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
                src = ASTSource(fn=kernel, signature=sig, constexprs=index)
                options = {"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                out.append((name, names[dtype], tile, compiled.metadata.shared))
    return out

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

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import vlds.kernels
from vlds.config import ConfigError
from vlds.kernels import adapter_forward, adapter_reference, check
from vlds.kernels.check import CHECK_ROWS, OUTPUTS, errors, failures, forward_backward

INTERPRET = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
with pytest.MonkeyPatch.context() as env:  # see interpreter_env for why only here
    for key, value in INTERPRET.items():
        env.setenv(key, value)
    pytest.importorskip("triton")
    import triton

    from vlds.kernels import fused_adapter as fa

DEVICE = "cpu" if fa.interpreting() else "cuda"
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


@pytest.fixture(autouse=True)
def no_self_check():
    """Dispatch tests count launches: the self-check (tested on its own below) is off."""
    vlds.kernels.configure(self_check=False)
    yield
    vlds.kernels.configure(self_check=True)


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


def check_case(m, d, b, dtype, **kw):
    """The kernels (fa.fused_adapter: no dispatch, no self-check) against the bound."""
    seed, args, dy = adapter_inputs(m, d, b, dtype, **kw)
    with fa.poison_outputs():
        fused = forward_backward(fa.fused_adapter, args, dy)
    errs = errors(args, dy, fused)
    for name, (err, eager_err, _) in errs.items():
        print(f"M={m} d={d} b={b} {str(dtype)[6:]} {name}: fused {err:.2e} eager {eager_err:.2e}")
    bad = failures(errs, dtype)  # NaN (an unwritten element) fails here too
    assert not bad, f"M={m}, d={d}, b={b}, {dtype}, seed {seed}: " + "; ".join(bad)
    return errs


@pytest.mark.parametrize(("m", "d", "b", "dtype"), DEFAULT)
def test_fused_adapter_matches_reference(m, d, b, dtype):
    check_case(m, d, b, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("m", "d", "b", "dtype"), FULL)
def test_fused_adapter_matches_reference_full_grid(m, d, b, dtype):
    check_case(m, d, b, dtype)


def test_fp32_gpu_tiling(monkeypatch):
    # the interpreter tiles every dtype like 16-bit; here the untuned fp32 tiling
    monkeypatch.setattr(fa, "INTERPRETER_TILING", torch.float32)
    check_case(77, 200, 20, torch.float32)


def test_leading_shape_and_fp32_master_weights():
    # (B, T, d) fp16 activations with fp32 parameters: cast like the reference, fp32 grads back
    errs = check_case(45, 96, 12, torch.float16, w_dtype=torch.float32, lead=(3,))
    assert set(errs) == set(OUTPUTS)


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


# ---- the self-check (vlds/kernels/check.py) -------------------------------------------------


def route_auto_to_fused(monkeypatch):
    """Make "auto" take the fused path on CPU tensors, as it does on CUDA ones."""
    monkeypatch.setattr(vlds.kernels, "_auto_reason", lambda h, b: "")


def launches_of(monkeypatch):
    calls = []
    real = fa.adapter_forward_op
    monkeypatch.setattr(fa, "adapter_forward_op", lambda *a: calls.append(1) or real(*a))
    return calls


def test_self_check_keeps_correct_kernels(monkeypatch):
    vlds.kernels.configure(self_check=True)
    calls = launches_of(monkeypatch)
    _, args, dy = adapter_inputs(70, 64, 16, torch.float32, seed=3)
    y = adapter_forward(*args, mode="on")  # checked: the fused pass of the check, then this one
    adapter_forward(*args, mode="on")  # checked once per shape: one more launch only
    assert len(calls) == 3
    torch.testing.assert_close(y, adapter_reference(*args), rtol=1e-5, atol=1e-5)
    (entry,) = vlds.kernels.report().values()
    assert entry["path"] == "fused" and entry["checked"] is True
    assert entry["reason"] == "matches the reference on 70 rows"
    assert set(entry["max_rel_error"]) == set(OUTPUTS)
    assert max(entry["max_rel_error"].values()) < 1e-4  # fp32
    assert list(vlds.kernels.report()) == ["d64_b16_float32_cpu_on"]


def test_self_check_falls_back_from_wrong_kernels(monkeypatch, caplog):
    """A tiling bug (the bottleneck tile smaller than the bottleneck: columns 16-23 of b = 24
    never computed): "auto" logs once and runs the reference for that shape from then on;
    "on" refuses."""
    vlds.kernels.configure(self_check=True)
    route_auto_to_fused(monkeypatch)
    monkeypatch.setattr(fa, "_pieces", lambda b: {"BLOCK_B": 16, "BLOCK_B2": 0})
    calls = launches_of(monkeypatch)
    _, args, dy = adapter_inputs(70, 64, 24, torch.float32, seed=4)
    with caplog.at_level("WARNING", logger="vlds.kernels"):
        for _ in range(3):
            y = adapter_forward(*args, mode="auto")
    assert len(calls) == 1  # the check's launch only
    assert torch.equal(y, adapter_reference(*args))  # the fallback is the reference, exactly
    warnings = [r for r in caplog.records if "failed their self-check" in r.getMessage()]
    assert len(warnings) == 1 and "d 64, b 24, torch.float32" in warnings[0].getMessage()
    entry = vlds.kernels.report()["d64_b24_float32_cpu_auto"]
    assert entry["path"] == "reference" and entry["checked"] is True
    assert entry["reason"].startswith("self-check failed: y: max abs error")
    with pytest.raises(RuntimeError, match="failed their self-check .* use peft.fused_kernel=auto"):
        adapter_forward(*args, mode="on")


def test_self_check_falls_back_from_a_compile_error(monkeypatch):
    vlds.kernels.configure(self_check=True)
    route_auto_to_fused(monkeypatch)

    def broken(*_):
        raise triton.CompilationError("_through_kernel.py", None, "ptxas error: out of registers")

    monkeypatch.setattr(fa, "adapter_forward_op", broken)
    _, args, _ = adapter_inputs(40, 32, 16, torch.float32, seed=5)
    assert torch.equal(adapter_forward(*args, mode="auto"), adapter_reference(*args))
    entry = vlds.kernels.report()["d32_b16_float32_cpu_auto"]
    assert entry["path"] == "reference"
    assert entry["reason"].startswith("self-check failed: CompilationError")


def test_probe_runs_the_check_in_a_child_process():
    """What "auto" does first on CUDA: the check on random inputs of the shape, in a child."""
    result = check.probe(64, 16, torch.float32, torch.device(DEVICE))
    assert result["ok"] is True
    assert result["reason"] == f"matches the reference on {CHECK_ROWS} rows"
    assert set(result["max_rel_error"]) == set(OUTPUTS)
    assert max(result["max_rel_error"].values()) < 1e-4  # fp32


FAULT = "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
# what the first H200 run printed: the traceback, the fault, pages of destructor warnings
FAULT_STDERR = (
    'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
    f"    raise RuntimeError(...)\n{FAULT}\nSearch for `cudaErrorIllegalAddress' in the docs\n"
    + "[W] Warning: CUDA warning: an illegal memory access was encountered (function ~CUDAEvent)\n"
    * 50
)


@pytest.mark.parametrize(
    ("child", "reason"),
    [
        (
            f"import os, sys; sys.stderr.write({FAULT_STDERR!r}); sys.stderr.flush(); os.abort()",
            f"the probe process was killed by SIGABRT: {FAULT}",
        ),
        ("import time; time.sleep(30)", "the probe process did not finish in 2 s"),
    ],
    ids=["fault", "hang"],
)
def test_auto_survives_kernels_that_kill_or_hang_their_process(monkeypatch, child, reason):
    """A kernel that faults poisons its process's CUDA context: "auto" learns it from a child
    process and never launches the kernels itself; the run goes on with the reference."""
    vlds.kernels.configure(self_check=True)
    route_auto_to_fused(monkeypatch)
    monkeypatch.setattr(vlds.kernels, "_isolate", lambda h: True)
    monkeypatch.setattr(check, "probe_command", lambda *a: [sys.executable, "-c", child])
    monkeypatch.setattr(check, "PROBE_TIMEOUT_S", 2)
    calls = launches_of(monkeypatch)
    _, args, _ = adapter_inputs(40, 32, 16, torch.float32, seed=7)
    assert torch.equal(adapter_forward(*args, mode="auto"), adapter_reference(*args))
    assert calls == []
    entry = vlds.kernels.report()["d32_b16_float32_cpu_auto"]
    assert entry["path"] == "reference" and entry["checked"] is True
    assert entry["reason"] == f"self-check failed: in a child process: {reason}"


def test_self_check_off_and_the_reference_reasons(monkeypatch):
    calls = launches_of(monkeypatch)
    _, args, _ = adapter_inputs(40, 32, 16, torch.float32, seed=6)
    adapter_forward(*args, mode="on")  # self-check off (the module's fixture): one launch
    adapter_forward(*args, mode="off")
    adapter_forward(*args, mode="auto")
    assert len(calls) == 1
    report = vlds.kernels.report()
    assert report["d32_b16_float32_cpu_on"] == {
        "path": "fused",
        "reason": "self-check off (peft.fused_check=false)",
        "checked": False,
    }
    assert report["d32_b16_float32_cpu_off"]["reason"] == "peft.fused_kernel=off"
    assert report["d32_b16_float32_cpu_auto"]["reason"] == (
        "cpu tensors: the fused kernels run on CUDA"
    )


# ---- torch.compile, and compiling for a GPU without one --------------------------------------


def test_torch_compile_keeps_one_graph():
    """The kernels are torch.library custom ops: fullgraph=True fails on any graph break. The
    compiled function's output and gradients equal the uncompiled fused path's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def f(h, *w):
        return adapter_forward(h, *w, mode="on").square().sum()

    _, args, _ = adapter_inputs(50, 64, 16, torch.float32, seed=7)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = forward_backward(compiled, args, torch.tensor(1.0))
    want = forward_backward(f, args, torch.tensor(1.0))
    assert len(graphs) == 1
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "vlds.adapter_forward.default" in ops
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("every_config", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kernels_compile_for_h100(every_config):
    """Every kernel variant compiles for sm_90 in fp32, fp16 and bf16 (the interpreter cannot
    run bf16), and the default tiling fits an H100's 227 KB of shared memory per block. Run in
    a process where the kernels are built compiled (no TRITON_INTERPRET)."""
    code = (  # b = 96: two bottleneck pieces (64 + 32); b = 128: one
        "import json, torch; from vlds.kernels import fused_adapter as fa; "
        f"rows = fa.compile_for_gpu(90, every_config={every_config}); "
        f"rows += fa.compile_for_gpu(90, (torch.bfloat16,), 128, every_config={every_config}); "
        "print(json.dumps(rows))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    kinds = {(name, dtype, tile["BLOCK_B"], tile["BLOCK_B2"]) for name, dtype, tile, _ in rows}
    names = ("through_fwd", "through_bwd", "weight_grad")
    two_pieces = {(n, d, 64, 32) for n in names for d in ("fp32", "fp16", "bf16")}
    assert kinds == two_pieces | {(n, "bf16", 128, 0) for n in names}
    if not every_config:
        assert len(rows) == 12
        assert all(shared <= 227 * 1024 for *_, shared in rows)


@pytest.mark.gpu
@gpu
def test_gpu_self_check_passes_in_bf16():
    """What a GPU run does first: "auto", bf16, t5-base sizes: checked, then fused."""
    vlds.kernels.configure(self_check=True)
    _, args, _ = adapter_inputs(2 * 56 * 8, 768, 96, torch.bfloat16, w_dtype=torch.float32)
    adapter_forward(*args, mode="auto")
    (entry,) = vlds.kernels.report().values()
    assert entry["path"] == "fused" and entry["checked"], entry


def test_autotune_configs_are_pruned_to_the_register_budget():
    """b = 192 (128 + 64): no 128-row config (a 128 x 192 fp32 accumulator); b = 96 keeps all."""
    wide = fa._fits(fa._THROUGH_CONFIGS, {}, **fa._pieces(192))
    assert {c.kwargs["BLOCK_M"] for c in wide} == {32, 64}
    assert fa._fits(fa._THROUGH_CONFIGS, {}, **fa._pieces(96)) == fa._THROUGH_CONFIGS
    assert fa._THROUGH_CONFIGS[0].kwargs == {"BLOCK_M": 64, "BLOCK_D": 64}  # _blocks' first


# ---- bench/kernel_configs.py: each autotune config in its own process ------------------------


def _kernel_configs(tmp_path, *argv):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "bench/kernel_configs.py", "--parallel", "2", "--json", str(out)]
    proc = subprocess.run(
        [*cmd, *argv], capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    rows = json.loads(out.read_text()) if out.is_file() else []
    return proc, rows


def test_kernel_configs_runs_each_config_alone_and_reports_what_failed(tmp_path):
    """Pinned configs match the reference (in the interpreter, fp32); a dtype the interpreter
    computes wrongly (bf16) is reported as a mismatch and fails the run; a child that does not
    answer in time is reported as such."""
    proc, rows = _kernel_configs(tmp_path, "--configs", "0,8", "--shapes", "70x64x24:float32")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert [r["shapes"] for r in rows] == [{"70x64x24:float32": "match"}] * 2
    assert "BLOCK_M 128" in rows[1]["config"].split("grad")[1]  # the weight gradient's (128, 8, 3)
    assert proc.stdout.strip().endswith("kernel_configs: 2 of 2 config pairs clean")
    if fa.interpreting():  # compiled on a GPU, bf16 is right
        proc, rows = _kernel_configs(tmp_path, "--configs", "0", "--shapes", "70x64x24:bfloat16")
        assert proc.returncode == 1
        assert rows[0]["shapes"]["70x64x24:bfloat16"].startswith("MISMATCH y: max abs error")
    proc, rows = _kernel_configs(tmp_path, "--configs", "0", "--timeout", "1")
    assert proc.returncode == 1 and rows[0]["died"] == "no answer in 1 s"

"""Every autotune config of the fused adapter kernels, each alone in its own process.

    python bench/kernel_configs.py                 # on a GPU: every config, the GPU check's shapes
    python bench/kernel_configs.py --shapes 70x64x24:float32 --configs 0,8   # a few, any device

triton's autotuner runs every config of a kernel before the code after it sees a result, in
the training process. A config that faults (an illegal memory access) leaves that process's
CUDA context unusable, so everything after it fails, and which config it was is lost: the
first H200 run (bench/RESULTS.md, "First run on a GPU") ended that way. Here each config runs
in a child process of its own with no autotuning: the `_through` configs (forward and both
backward kernels' first pass) with the weight-gradient kernel at its first config, then each
weight-gradient config with `_through` at its first. Each child runs the fused forward and
backward on each shape and holds every output to the kernel tests' bound
(vlds/kernels/check.py). A row per config: "match", "MISMATCH <outputs>", "out of resources"
(triton's OutOfResources: the autotuner skips such a config), or how the child died.

Without CUDA the children run the kernels in the Triton interpreter (fp32 / fp16 only); there
only BLOCK_M and BLOCK_D shape the arithmetic (warps and stages are ignored). Exit status 1
when any config mismatched or died (out of resources does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (M, d, b, dtype): ragged M, two bottleneck pieces (96 = 64 + 32), one padded piece (24 -> 32)
GPU_SHAPES = "1151x768x96:bfloat16,4099x512x24:bfloat16,1151x768x96:float32"
CPU_SHAPES = "70x64x24:float32"


def parse_shapes(text: str) -> list[tuple[int, int, int, str]]:
    out = []
    for item in text.split(","):
        dims, dtype = item.split(":")
        m, d, b = (int(x) for x in dims.split("x"))
        out.append((m, d, b, dtype))
    return out


def jobs() -> list[tuple[int, int]]:
    """(through config, grad config) pairs: each config of one kernel, the other at its first."""
    from vlds.kernels import fused_adapter as fa

    pairs = [(t, 0) for t in range(len(fa._THROUGH_CONFIGS))]
    return pairs + [(0, g) for g in range(1, len(fa._GRAD_CONFIGS))]


def pin(fa, through: int, grad: int) -> str:
    """Launch the kernels with one config each, untuned: the raw kernels, and a launch
    configuration that carries the config's block sizes, warps and stages."""
    tc, gc = fa._THROUGH_CONFIGS[through], fa._GRAD_CONFIGS[grad]
    fa._through, fa._weight_grad = fa._through_kernel, fa._weight_grad_kernel

    def launch_cfg(bottleneck, dtype, kernel):
        c = gc if kernel == "grad" else tc
        cfg = {**fa._pieces(bottleneck), **c.kwargs}
        if kernel == "grad":
            cfg["BLOCK_D"] = fa._grad_block_d(dtype)
        return {**cfg, "num_warps": c.num_warps, "num_stages": c.num_stages}

    fa._launch_cfg = launch_cfg

    def show(c):
        return (
            " ".join(f"{k} {v}" for k, v in c.kwargs.items())
            + f" warps {c.num_warps} "
            + (f"stages {c.num_stages}")
        )

    return f"through [{show(tc)}], grad [{show(gc)}]"


def child(through: int, grad: int, shapes) -> None:
    """One config pair on every shape; prints one JSON line per shape."""
    import torch

    from vlds.kernels import fused_adapter as fa
    from vlds.kernels.check import errors, failures, forward_backward

    print(json.dumps({"config": pin(fa, through, grad)}), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for m, d, b, name in shapes:
        dtype = getattr(torch, name)
        g = torch.Generator().manual_seed(0)

        def rand(*shape, scale=1.0, g=g, dtype=dtype):  # scaled as the tests: z ~ N(0, 1)
            t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
            return t.to(device).requires_grad_()

        args = [rand(m, d), rand(b, d, scale=d**-0.5), rand(b, scale=0.5)]
        args += [rand(d, b, scale=b**-0.5), rand(d, scale=0.5)]
        dy = rand(m, d).detach()
        shape = f"{m}x{d}x{b}:{name}"
        try:
            out = forward_backward(fa.fused_adapter, args, dy)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (a compile error is a row, not a crash)
            kind = "out of resources" if type(e).__name__ == "OutOfResources" else "error"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(json.dumps({"shape": shape, "result": kind, "detail": first}), flush=True)
            continue
        bad = failures(errors(args, dy, out), dtype)
        result = "MISMATCH " + "; ".join(bad) if bad else "match"
        print(json.dumps({"shape": shape, "result": result}), flush=True)


def run_pair(through: int, grad: int, shapes: str, timeout: float) -> dict:
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, __file__, "--child", f"{through},{grad}", "--shapes", shapes]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        died = f"no answer in {timeout:.0f} s"
        return {"through": through, "grad": grad, "config": "?", "shapes": {}, "died": died}
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    out = {"through": through, "grad": grad, "config": rows[0]["config"] if rows else "?"}
    out["shapes"] = {r["shape"]: r["result"] for r in rows[1:]}
    if proc.returncode != 0:
        from vlds.kernels.check import exit_reason

        out["died"] = exit_reason(proc)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help="MxDxB:dtype,... (default: by device)")
    p.add_argument("--configs", default=None, help="comma list of row numbers (default: all)")
    p.add_argument("--parallel", type=int, default=4, help="children at a time")
    p.add_argument("--timeout", type=float, default=120, help="seconds per child")
    p.add_argument("--json", default="", help="write the rows to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.child:
        through, grad = (int(x) for x in args.child.split(","))
        child(through, grad, parse_shapes(args.shapes))
        return 0
    import torch

    cuda = torch.cuda.is_available()
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    pairs = jobs()
    if args.configs:
        pairs = [pairs[int(i)] for i in args.configs.split(",")]
    device = torch.cuda.get_device_name(0) if cuda else "CPU (Triton interpreter)"
    print(f"{device}: {len(pairs)} config pairs, each in its own process; shapes {shapes}")
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda tg: run_pair(*tg, shapes, args.timeout), pairs))
    names = parse_shapes(shapes)
    header = ["row", "configs"] + [f"{m}x{d}x{b} {t}" for m, d, b, t in names] + ["process"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    failed = 0
    for n, r in enumerate(rows):
        cells = [r["shapes"].get(f"{m}x{d}x{b}:{t}", "-") for m, d, b, t in names]
        died = r.get("died", "")
        failed += bool(died) or any(c.startswith(("MISMATCH", "error")) for c in cells)
        print(f"| {n} | {r.get('config', '?')} | " + " | ".join(cells) + f" | {died or 'ok'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"kernel_configs: {len(rows) - failed} of {len(rows)} config pairs clean")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

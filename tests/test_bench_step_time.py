"""bench/step_time.py: the row grammar, the FLOP count against a hand count, and the script end
to end at a tiny size (DeepSpeed rows and a plain-PyTorch row; the JSON rows make sense)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import step_time

REPO = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "64", "--layers", "2", "--heads", "4", "--d-ff", "128", "--vocab", "512"]


def test_rows_parse_plain_and_kernel_modes():
    rows = step_time.parse_rows("single_adapter:fused=off,single_adapter:fused=on", "auto", True)
    assert [(r.method, r.fused, r.plain) for r in rows] == [
        ("single_adapter", "off", False),
        ("single_adapter", "off", True),
        ("single_adapter", "on", False),
        ("single_adapter", "on", True),
    ]
    assert rows[1].label == "single_adapter fused=off (plain torch)"
    rows = step_time.parse_rows("single_adapter,full_finetune,plain:full_finetune", "off")
    assert [r.label for r in rows] == [
        "single_adapter",
        "full_finetune",
        "full_finetune (plain torch)",
    ]
    assert {r.fused for r in rows} == {"off"}  # --fused-kernel where a row names none
    with pytest.raises(SystemExit, match="fused=auto"):
        step_time.parse_rows("single_adapter:fused=maybe", "auto")
    rows = step_time.parse_rows("single_lora,peft:single_lora", "auto", True)
    assert [(r.label, r.plain, r.peer) for r in rows] == [
        ("single_lora", False, False),
        ("single_lora (plain torch)", True, False),  # a peer row is not the plain twin
        ("single_lora (HF peft, plain torch)", True, True),
    ]
    with pytest.raises(SystemExit, match="a peft: row exists for single_lora"):
        step_time.parse_rows("peft:single_adapter", "auto")


def test_the_peft_peer_computes_vlds_lora_with_hf_peft():
    """The peer row's model: the same base weights, trainable set and, with vlds' LoRA weights
    copied into PEFT's, the same outputs (dropout off)."""
    import torch

    from vlds.peft.lora import lora_targets

    args = step_time.parse_args([*TINY, "--batch", "2"])
    cfg = step_time.build_config_for(args, "single_lora", "off")
    torch.manual_seed(cfg.train.seed)
    ours = step_time.build_vl_model(cfg, args.vocab)
    peer = step_time.build_peer_model(cfg, args.vocab)
    trained = {n.replace(".base_layer", "") for n, p in peer.named_parameters() if p.requires_grad}
    lora_names = {n for n in trained if "lora_" in n}
    assert len(lora_names) == 2 * len(lora_targets(ours.lm, "t5")) > 0  # A and B per target
    assert trained - lora_names == {
        n for n, p in ours.named_parameters() if p.requires_grad and not n.startswith("peft.")
    }
    modules = dict(peer.lm.named_modules())
    with torch.no_grad():
        for key, path, _ in lora_targets(ours.lm, "t5"):
            ours.peft[key].B.weight.normal_()  # B starts at 0: make the update count
            modules[path].lora_A["default"].weight.copy_(ours.peft[key].A.weight)
            modules[path].lora_B["default"].weight.copy_(ours.peft[key].B.weight)
    ours.eval(), peer.eval()
    batch = step_time.make_batch(args, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert peer(batch).item() == pytest.approx(ours(batch).item(), rel=1e-5)


def test_config_carries_the_kernel_mode():
    args = step_time.parse_args([*TINY, "--fused-kernel", "on"])
    cfg = step_time.build_config_for(args, "single_adapter")
    assert cfg.peft.fused_kernel == "on"
    assert step_time.build_config_for(args, "single_adapter", "off").peft.fused_kernel == "off"
    if hasattr(cfg.peft, "fused_check"):  # timing rows skip the kernel's first-use check
        assert cfg.peft.fused_check is False


def test_model_flops_match_a_hand_count():
    """d 8, 2 heads, 1 + 1 layers, d_ff 16, vocab 10, 4 text + 36 visual tokens -> 2 target
    tokens, bottleneck 8 / 2 = 4. Forward multiply-adds per sample, by hand:"""
    args = step_time.parse_args(
        ["--d-model", "8", "--heads", "2", "--layers", "1", "--d-ff", "16", "--vocab", "10"]
        + ["--text-len", "4", "--target-len", "2", "--reduction-factor", "2"]
    )
    te, td = 40, 2
    visual = 36 * 2048 * 8  # 589,824: trained, backward 1x (no input gradient)
    weights = (
        4 * te * 64  # encoder q,k,v,o: 10,240
        + 2 * te * 8 * 16  # encoder FFN: 10,240
        + 4 * td * 64  # decoder self q,k,v,o: 512
        + 2 * td * 64  # decoder cross q,o: 256
        + 2 * te * 64  # decoder cross k,v: 5,120
        + 2 * td * 8 * 16  # decoder FFN: 512
        + td * 8 * 10  # LM head: 160
    )
    assert weights == 27_040
    scores = 2 * te * te * 8 + 2 * td * td * 8 + 2 * td * te * 8  # 25,600 + 64 + 1,280
    adapters = (2 * te + 3 * td) * 2 * 8 * 4  # 2 encoder + 3 decoder sites: 5,504
    # training = forward + backward; FLOPs = 2 x multiply-adds
    full = 2 * (2 * visual + 3 * weights + 3 * scores)
    adapter = 2 * (2 * visual + 2 * weights + 3 * scores + 3 * adapters)
    assert (full, adapter) == (2_683_200, 2_662_144)
    assert step_time.model_flops_per_sample(args, "full_finetune") == full
    assert step_time.model_flops_per_sample(args, "single_adapter") == adapter
    # the same sample through one task's adapter: per-task adapters cost the same per sample
    assert step_time.model_flops_per_sample(args, "multiple_adapters") == adapter


def test_peak_by_device_name():
    assert step_time.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert step_time.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert step_time.peak_bf16("NVIDIA H200") == 989e12
    assert step_time.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert step_time.peak_bf16("Tesla V100-SXM2-16GB") is None


def test_step_time_tiny(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "step_time.py"),
        *TINY,
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--methods",
        "single_lora,peft:single_lora,full_finetune,plain:full_finetune",
        "--json",
        str(out),
    ]
    # The script starts one worker subprocess per row, as in a real run.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())}

    peer_label = "single_lora (HF peft, plain torch)"
    assert set(rows) == {"single_lora", peer_label, "full_finetune", "full_finetune (plain torch)"}
    adapter, full = rows["single_lora"], rows["full_finetune"]
    plain, peer = rows["full_finetune (plain torch)"], rows[peer_label]
    assert (adapter["method"], full["method"], plain["method"], peer["method"]) == (
        "single_lora",
        "full_finetune",
        "full_finetune",
        "single_lora",
    )
    assert [r["engine"] for r in (adapter, full, plain, peer)] == [
        "deepspeed",
        "deepspeed",
        "plain",
        "peft",
    ]
    assert full["trainable"] > adapter["trainable"] == peer["trainable"] > 0
    assert plain["trainable"] == full["trainable"]  # the same model
    assert 0 < adapter["percent"] < 100
    args = step_time.parse_args([*TINY, "--batch", "2"])
    for r in rows.values():
        assert len(r["step_times_s"]) == 2
        assert r["step_median_s"] > 0 and r["step_p90_s"] >= r["step_median_s"]
        assert r["peak_rss_gb"] > 0
        assert r["samples_per_s"] == pytest.approx(2 / r["step_median_s"])
        assert r["model_flops_per_sample"] == step_time.model_flops_per_sample(args, r["method"])
        assert r["mfu"] is None  # CPU
    # the engine's overhead: the DeepSpeed row over its plain twin, and only there
    assert full["engine_vs_plain"] == pytest.approx(full["step_median_s"] / plain["step_median_s"])
    assert "engine_vs_plain" not in adapter and "engine_vs_plain" not in plain
    assert adapter["engine_vs_peer"] == pytest.approx(
        adapter["step_median_s"] / peer["step_median_s"]
    )
    assert "engine_vs_peer" not in full and "engine_vs_peer" not in peer
    # The export holds the trainable tensors only (fp32 + a small safetensors header).
    assert adapter["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert 4 * adapter["trainable"] <= adapter["checkpoint_bytes"] < 4 * full["trainable"]
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout  # the comparison line was printed
    assert "engine / plain" in proc.stdout and "engine / peer" in proc.stdout
    assert "MFU" in proc.stdout

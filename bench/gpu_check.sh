#!/usr/bin/env bash
# The GPU path checks itself: one command, one markdown report.
#
#   bash bench/gpu_check.sh [REPORT.md]        # default runs/gpu_check/report.md
#
# Steps, each under its own timeout and all within GPU_CHECK_BUDGET_S (default 540 s: 9
# minutes on one H100 / H200; a step that would start with less than 10 s of it left is
# reported as not run, and counts as failed):
#   0. bench/kernel_configs.py: every autotune config alone, in its own process (a config
#      that faults takes only its process down; the first H200 run lost everything to one)  (CUDA)
#   1. pytest tests/test_kernels.py -m gpu: the fused kernels compiled, bf16 included  (CUDA)
#   2. bench/adapter_kernel.py: eager vs torch.compile vs fused, GB/s, the step with the kernel
#      off and on (CUDA); without CUDA `--check`, the Triton interpreter check
#   3. bench/step_time.py, bf16 at t5-base size: the single adapter with the kernel off and on
#      and full fine-tuning, each beside its plain-PyTorch twin; samples/s, MFU     (CUDA)
#   4. vlds/train.py, preset t5-base-random on the shapes world (generated first): TRAIN_STEPS
#      steps with a checkpoint, then a resume to RESUME_STEPS, under ZeRO-2 and under ZeRO-3;
#      samples/s from each run's metrics.json / metrics.jsonl                       (CUDA)
# A failing step does not stop the others. Each section of the report holds the command, its
# output and its exit status; without CUDA the report and stdout end with the skipped steps.
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 without the Python env.
# The training runs write into the report's folder (train-zero2/, train-zero3/, replaced on
# every check); step 3's rows go to step_time.json there.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
REPORT=${1:-runs/gpu_check/report.md}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
TRAIN_STEPS=200
RESUME_STEPS=300

if ! command -v "$PYTHON" >/dev/null; then
    echo "error: no Python at $PYTHON: run \`make install\` first (or set PYTHON=...)" >&2
    exit 2
fi
case "$PYTHON" in */*) PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH" ;; esac
export PATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

mkdir -p "$(dirname "$REPORT")"
OUT=$(cd "$(dirname "$REPORT")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
RUNNING=""  # the `timeout` of the step in progress: an interrupt ends its whole process group
trap '[ -n "$RUNNING" ] && kill -TERM "$RUNNING" 2>/dev/null; exit 130' INT TERM
START=$SECONDS
FAILED=()
SUMMARY=()

# Output as the report keeps it: progress bars collapsed to their last state (text after the
# last carriage return), at most 20 + 150 lines.
clean() {
    sed 's/.*\r//' "$1" | awk '{ line[NR] = $0 }
        END {
            if (NR <= 170) { for (i = 1; i <= NR; i++) print line[i]; exit }
            for (i = 1; i <= 20; i++) print line[i]
            print "[... " (NR - 170) " lines cut ...]"
            for (i = NR - 149; i <= NR; i++) print line[i]
        }'
}

# step TITLE LIMIT_S CMD...: runs CMD under `timeout` (the whole process group), its output on
# stdout and into the report's section for TITLE; returns CMD's exit status.
step() {
    local title=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    {
        printf '## %s\n\n```bash\n%s\n```\n\n' "$title" "$*"
    } >>"$REPORT"
    if ((left < 10)); then
        echo "not run: the check's time budget (${BUDGET_S} s) is spent" | tee -a "$REPORT"
        echo >>"$REPORT"
        FAILED+=("$title")
        SUMMARY+=("| $title | not run (time budget spent) | 0 |")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "==> $title (timeout ${limit} s)"
    echo "\$ $*"
    local t0=$SECONDS rc
    : >"$TMP/out"  # there before `tail` opens it
    timeout --kill-after=10 "$limit" "$@" >>"$TMP/out" 2>&1 &
    RUNNING=$!
    tail -f --pid="$RUNNING" "$TMP/out" 2>/dev/null
    wait "$RUNNING"
    rc=$?
    RUNNING=""
    local took=$((SECONDS - t0)) status
    if ((rc == 0)); then
        status="passed"
    elif ((rc == 124 || rc == 137)); then
        status="FAILED: timed out after ${limit} s (exit status $rc)"
    else
        status="FAILED (exit status $rc)"
    fi
    {
        printf '````text\n'
        clean "$TMP/out"
        printf '````\n\nexit status: %s, %s s\n\n' "$rc" "$took"
    } >>"$REPORT"
    echo "<== $title: $status, ${took} s"
    ((rc == 0)) || FAILED+=("$title")
    SUMMARY+=("| $title | $status | $took |")
    return "$rc"
}

# note TEXT...: a line under the current section (report and stdout)
note() {
    printf '%s\n' "$@" | tee -a "$REPORT"
    echo >>"$REPORT"
}

# throughput TITLE DIR STEP: the run's samples/s under its section; fails unless it ended at STEP
throughput() {
    local title=$1 lines rc
    lines=$("$PYTHON" bench/gpu_check.py throughput "$2" --expect-step "$3" 2>&1)
    rc=$?
    note "$lines"
    if ((rc != 0)); then
        FAILED+=("$title (outputs)")
        SUMMARY+=("| $title: outputs | FAILED | - |")
    fi
}

if ! "$PYTHON" bench/gpu_check.py header >"$TMP/header" 2>"$TMP/header.err"; then
    cat "$TMP/header.err" >&2
    echo "error: $PYTHON bench/gpu_check.py header failed: is the env installed (\`make install\`)?" >&2
    exit 2
fi
{
    cat "$TMP/header"
    echo "- command: bash bench/gpu_check.sh $REPORT (time budget ${BUDGET_S} s)"
    echo
} >"$REPORT"
cat "$TMP/header"
CUDA=0
grep -q '^- CUDA: available' "$TMP/header" && CUDA=1

KERNEL_CONFIGS="0. each autotune config of the fused kernels alone"
KERNEL_TESTS="1. fused kernel tests on the GPU"
KERNEL_BENCH="2. adapter kernel benchmark"
STEP_TIME="3. step time, samples/s and MFU at t5-base size (bf16)"
TRAIN="4. training at t5-base size, checkpoint and resume, ZeRO-2 and ZeRO-3"
SKIPPED=()

if ((CUDA)); then
    step "$KERNEL_CONFIGS" 100 "$PYTHON" bench/kernel_configs.py --json "$OUT/kernel_configs.json"
    step "$KERNEL_TESTS" 90 "$PYTHON" -m pytest tests/test_kernels.py -m gpu -q
    step "$KERNEL_BENCH" 150 "$PYTHON" bench/adapter_kernel.py
    step "$STEP_TIME" 150 "$PYTHON" bench/step_time.py --plain \
        --methods single_adapter:fused=off,single_adapter:fused=on,full_finetune \
        --json "$OUT/step_time.json"
    step "4. shapes world for the training runs (generated once, cached)" 60 \
        "$PYTHON" -m vlds.data.synthetic
    # t5-base sizes, random weights, the shapes world's tokenizer and tiny tower; evaluation
    # kept to one short batch per task (the runs check training, checkpoints and resume); the
    # stage is forced: on one GPU train.zero_stage=auto would take stage 1 (bf16)
    args=(--preset t5-base-random --data.batch_size=32 --data.num_workers=4
        --train.save_every=100 --train.log_every=20 --train.report_to=none
        --eval.max_samples=32 --eval.batch_size=32 --eval.max_new_tokens=8
        --eval.shuffled_images=false --eval.java_metrics=false)
    for zero in 2 3; do
        dir="$OUT/train-zero$zero"
        rm -rf "$dir" "$dir".[0-9]*
        title="4. ZeRO-$zero: $TRAIN_STEPS steps, checkpoints at 100 and $TRAIN_STEPS"
        step "$title" 90 "$PYTHON" vlds/train.py --deepspeed ds_configs/zero$zero.json \
            --train.zero_stage=$zero "${args[@]}" --train.out_dir="$dir" \
            --train.max_steps=$TRAIN_STEPS
        throughput "$title" "$dir" "$TRAIN_STEPS"
        title="4. ZeRO-$zero: resume from step $TRAIN_STEPS to $RESUME_STEPS"
        step "$title" 75 "$PYTHON" vlds/train.py --deepspeed ds_configs/zero$zero.json \
            --train.zero_stage=$zero "${args[@]}" --train.out_dir="$dir" \
            --train.max_steps=$RESUME_STEPS --train.resume=latest
        throughput "$title" "$dir" "$RESUME_STEPS"
    done
else
    step "$KERNEL_BENCH (no CUDA: the interpreter check)" 90 \
        "$PYTHON" bench/adapter_kernel.py --check
    SKIPPED=("$KERNEL_CONFIGS" "$KERNEL_TESTS" "$STEP_TIME" "$TRAIN")
fi

{
    printf '## Summary\n\n| step | status | seconds |\n|---|---|---:|\n'
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "total: $((SECONDS - START)) s; failed: ${#FAILED[@]}"
} >>"$REPORT"
echo
echo "report: $REPORT ($((SECONDS - START)) s; failed: ${#FAILED[@]})"
if ((${#FAILED[@]})); then
    echo "failed: $(printf '%s; ' "${FAILED[@]}")"
fi
if ((${#SKIPPED[@]})); then
    line="Skipped (no CUDA): $(printf '%s; ' "${SKIPPED[@]}")"
    line=${line%; }
    printf '\n%s\n' "$line" >>"$REPORT"
    echo "$line"
fi
((${#FAILED[@]} == 0))

#!/usr/bin/env bash
# One lent GPU, one hold: the measurements of issues 8, 10 and 11 as a background job that device
# calls start and poll (a call lasts at most 10 minutes; the job outlives it, the machine does not
# outlive 30 s of idleness, so poll at once after each call returns). Phases, in this order:
#
#   tune         scripts/tune_mhc_kernels.py at d12 shapes; the fastest correct tiles then apply to
#                every later phase (NANOCHAT_KERNEL_CONFIGS=results/tiles_d12.json)
#   decode       scripts/infer_bench.py at d12: baseline and mHC on the fused kernels, batch 1 and 64,
#                CUDA graphs with and without torch.compile
#   train_d12    scripts/bench_train.py at d12, 8 x 2048 tokens a micro-batch: baseline, mHC fused
#                (fp32 and bf16 streams), HF GPT-2, hyper-connections, with a profile (the mHC
#                reference row, 8x the baseline, is left to `--variants` calls: 2 minutes a run)
#   train_d20    the same at d20, 4 x 2048, without the peers (two variants compile at once:
#                both must fit one H100)
#   (then, at once, none of them timed against another)
#   loss_curve   scripts/loss_curve_check.py: d4 mHC, 300 steps, reference vs fused vs another seed (at once)
#   loss_curve_bf16  the same with the fused run's streams in bf16 (--mhc_stream_dtype bfloat16) against the
#                fp32 reference: may the cheaper streams become the default?
#   kill_resume  scripts/kill_resume_test.py on the GPU: d6 mHC, bf16, torch.compile, SIGKILLs
#   minigpt      the MiniGPT check of docs/benchmarks.md: both seed-002 presets and modern + mHC
#
#   bash scripts/gpu_session_bench.sh start [--phases tune,train_d12,decode] [--data_dir .carry/exp]
#        [--d12_variants baseline,mhc_fused] [--d20_variants ...]   (bench_train rows of those phases)
#   bash scripts/gpu_session_bench.sh poll 560      # waits up to 560 s; copies results to $OUT
#   bash scripts/gpu_session_bench.sh run ...       # the same job in the foreground
#
# Data (git-ignored, carried): .carry/exp (enwiki shards + GPT-2 table: scripts/arm_tools.py
# prepare-carry), .carry/data/tinyshakespeare/input.txt, and in .whl the hyper-connections and
# torch-einops-utils wheels (docs/kernels.md says how to make all three). Results:
# $JOB/results/*.json, *.md and the logs (poll packs them into $OUT/gpu_session_results.tar.gz);
# poll prints the job log, with the table of each phase as it ends.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

JOB="${GPU_JOB_DIR:-/tmp/nanochat_gpu_job}"
ACTION="${1:-}"; shift || true
# the measurements still owed, about 900 s of device time (decode, tune and loss_curve last ran
# 2026-12-06/07; train_d20 once the bf16 rows have said which streams to time); also kill_resume, minigpt
PHASES="train_d12,loss_curve_bf16"
DATA_DIR=.carry/exp
D12_VARIANTS=baseline,mhc_fused,mhc_fused_bf16,hf_gpt2,hc_mhc
D20_VARIANTS=baseline,mhc_fused,mhc_fused_bf16
CHAR_DATA_DIR=.carry/data
WAIT_S=560

case "$ACTION" in
    start|run)
        while [ $# -gt 0 ]; do
            case "$1" in
                --phases) PHASES="$2"; shift 2 ;;
                --data_dir) DATA_DIR="$2"; shift 2 ;;
                --char_data_dir) CHAR_DATA_DIR="$2"; shift 2 ;;
                --d12_variants) D12_VARIANTS="$2"; shift 2 ;;
                --d20_variants) D20_VARIANTS="$2"; shift 2 ;;
                *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
            esac
        done ;;
    poll) WAIT_S="${1:-560}" ;;
    *) sed -n '2,25p' "$0"; exit 2 ;;
esac

copy_out() {
    [ -n "${OUT:-}" ] || return 0
    # one tarball: a device call brings back at most 8 files
    tar czf "$OUT/gpu_session_results.tar.gz" -C "$JOB" results job.log 2>/dev/null
    cp "$JOB"/job.log "$OUT"/ 2>/dev/null
    return 0
}

if [ "$ACTION" = poll ]; then
    for i in $(seq "$WAIT_S"); do
        [ -f "$JOB/done" ] && break
        # every 30 s: a call cut off at its limit still brings back the phases finished so far
        if [ $((i % 30)) -eq 0 ]; then copy_out; fi
        sleep 1
    done
    cat "$JOB/job.log"
    copy_out
    if [ -f "$JOB/done" ]; then echo "job done"; else echo "job still running"; fi
    exit 0
fi

for need in "$DATA_DIR/enwiki2015/enwiki2015_val.txt.xz" "$CHAR_DATA_DIR/tinyshakespeare/input.txt"; do
    [ -f "$need" ] || { echo "error: $need is missing; see the header of $0 for what to carry" >&2; exit 2; }
done
if [ "$ACTION" = start ]; then
    rm -rf "$JOB"; mkdir -p "$JOB/results"
    setsid nohup bash "$0" run --phases "$PHASES" --data_dir "$DATA_DIR" --char_data_dir "$CHAR_DATA_DIR" \
        --d12_variants "$D12_VARIANTS" --d20_variants "$D20_VARIANTS" \
        > "$JOB/job.log" 2>&1 < /dev/null &
    echo "started $PHASES in $JOB (pid $!)"
    exit 0
fi

mkdir -p "$JOB/results"
R="$JOB/results"
PYTHON="${PYTHON:-python3}"
if ls .whl/*.whl > /dev/null 2>&1; then  # hyper-connections for the hc_mhc rows
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$JOB/site" .whl/*.whl \
        && export PYTHONPATH="$JOB/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NANOCHAT_CACHE_DIR="$JOB/cache"
has() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
say() { echo "[$(date -u +%H:%M:%S)] $*"; }

say "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1); commit ${NANOCHAT_COMMIT:-unknown}"
if has tune; then
    say "tune"
    timeout 300 "$PYTHON" scripts/tune_mhc_kernels.py --json "$R/tune_d12.json" --write_best "$R/tiles_d12.json" \
        > "$R/tune_d12.log" 2>&1
    grep -E "^best|configurations" "$R/tune_d12.log"
    if [ -s "$R/tiles_d12.json" ]; then export NANOCHAT_KERNEL_CONFIGS="$R/tiles_d12.json"; fi
fi
if has decode; then
    say "decode"
    timeout 240 "$PYTHON" scripts/infer_bench.py --depth 12 --models baseline,mhc_fused --modes cuda_graph,compiled \
        --mhc_modes cuda_graph,compiled --batch_sizes 1,64 --out "$R/infer_bench_d12.json" > "$R/infer_bench_d12.log" 2>&1
    tail -n 12 "$R/infer_bench_d12.log"
fi
if has train_d12; then
    say "train_d12"
    timeout 380 "$PYTHON" scripts/bench_train.py --depth 12 --batch_size 8 --jobs 2 --deadline_s 360 --profile 3 \
        --variants "$D12_VARIANTS" --json "$R/bench_train_d12.json" \
        > "$R/bench_train_d12.log" 2>&1
    tail -n 40 "$R/bench_train_d12.log"
fi
if has train_d20; then
    say "train_d20"
    timeout 380 "$PYTHON" scripts/bench_train.py --depth 20 --batch_size 4 --jobs 2 --deadline_s 360 \
        --variants "$D20_VARIANTS" --json "$R/bench_train_d20.json" \
        > "$R/bench_train_d20.log" 2>&1
    tail -n 10 "$R/bench_train_d20.log"
fi

pids=()
loss_curve_job() {  # NAME [loss_curve_check flags]: in the background; results $R/NAME.json and .log
    local name="$1"; shift
    say "$name (background)"
    timeout 400 "$PYTHON" scripts/loss_curve_check.py --jobs 3 --data_dir "$JOB/data" --out_dir "$JOB/$name" \
        --json "$R/$name.json" "$@" > "$R/$name.log" 2>&1 &
    pids+=($!)
}
if has loss_curve || has loss_curve_bf16; then  # base_train reads the GPT-2 table unpacked, as run_arm unpacks it
    "$PYTHON" -c "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); import run_arm; \
run_arm.copy_data(Path(sys.argv[1]), Path(sys.argv[2]))" "$DATA_DIR" "$JOB/data"
fi
if has loss_curve; then loss_curve_job loss_curve; fi
if has loss_curve_bf16; then loss_curve_job loss_curve_bf16 --fused_args="--mhc_stream_dtype bfloat16"; fi
if has kill_resume; then
    say "kill_resume (background)"
    timeout 400 "$PYTHON" scripts/kill_resume_test.py --device cuda --depth 6 --dtype bfloat16 --compile \
        --steps 200 --save_every 10 --kills 20 --time_limit_s 200 --data_dir "$CHAR_DATA_DIR" --out_dir "$JOB/kill_resume" \
        > "$R/kill_resume.log" 2>&1 &
    pids+=($!)
fi
if has minigpt; then
    for run in classic modern modern_mhc; do
        preset="minigpt_${run%_mhc}"; extra=(); [ "$run" = modern_mhc ] && extra=(--mhc_enabled)
        say "minigpt $run (background)"
        timeout 400 "$PYTHON" scripts/base_train.py --preset "$preset" "${extra[@]}" --time_budget_s 360 \
            --data_dir "$CHAR_DATA_DIR" --out_dir "$JOB/minigpt/$run" --overwrite > "$R/minigpt_$run.log" 2>&1 &
        pids+=($!)
    done
fi
for pid in "${pids[@]}"; do wait "$pid"; done
for name in loss_curve loss_curve_bf16; do if has "$name"; then tail -n 20 "$R/$name.log"; fi; done
if has kill_resume; then
    cp "$JOB"/kill_resume/report.json "$R/kill_resume.json" 2>/dev/null
    tail -n 5 "$R/kill_resume.log"
fi
if has minigpt; then
    for run in classic modern modern_mhc; do
        cp "$JOB/minigpt/$run/summary.json" "$R/minigpt_$run.summary.json" 2>/dev/null
        cp "$JOB/minigpt/$run/metrics.jsonl" "$R/minigpt_$run.metrics.jsonl" 2>/dev/null
        echo "minigpt $run: $(tail -n 1 "$R/minigpt_$run.log")"
    done
fi
# the logs of background phases are long: keep their tails only (a call brings back few files)
for f in "$R"/*.log; do [ -f "$f" ] || continue; tail -n 60 "$f" > "$f.tail" && mv "$f.tail" "$f"; done
say "all phases done"
touch "$JOB/done"

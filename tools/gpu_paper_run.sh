#!/usr/bin/env bash
# The whole GPU run of the paper's network on AN4, in one command that fits one device call
# (a lent H100/H200 with 16 cores, no package index, no corpus; at most ~9 minutes):
#
#   tools/gpu_paper_run.sh OUT [--wheels DIR] [--prepared DIR] [--stop-stage N] [--dry-run] [-- overrides...]
#   device: tools/gpu_paper_run.sh "$OUT" --wheels .whl --prepared .carry/an4   (carry .whl and .carry)
#   --dry-run: on a CPU (a GPU is required otherwise), the bench at one small batch; with -- model=tiny ...
#   (the overrides go to the bench too) the whole plan runs here in minutes (asrkd/experiments/paper_schedule/test_paper_recipe.py)
#
# Made beforehand on a machine with the index and the corpus (both git-ignored, ~45 MiB together):
#   python tools/offline_wheels.py --dest .whl --python-version 3.12
#   recipes/an4/run.sh --stop-stage 6 && python tools/pack_prepared.py recipes/an4 .carry/an4
#
# Steps, in the order of what matters most, each logged with its seconds, every result written
# under OUT as it is made (a snapshot of results/an4_paper, the models' histories and records and
# the decodes' WERs, every 30 s and at each step's end), so a run cut at the call's limit returns
# what it finished; OUT holds at most 5 files (the device returns 8):
#   run.log                        everything printed
#   train_throughput.json          bench/train_throughput.py (commit as results/bench/train_throughput_<gpu>.json)
#   train_throughput.profile.txt   only where a batch >= 1024 misses trainer/bound 0.9 or fused/sequential 1.7
#   an4_paper.tar                  results/an4_paper/ and recipes/an4/exp_paper/{dnn,decode}/*/{history,stage,wer}.json
#   steps.json                     each step's exit status and seconds
#
# The plan and the seconds expected on an H200 (bf16 autocast, batch 256). The 8x2560 net has
# 49.6 M weights: ~0.30 GFLOP a training frame, 68 TFLOP an epoch of AN4's 230,114 training
# frames; at batch 256 a step is bound by its ~60 kernel launches and Python (~1.5 ms), not by
# its 76 GFLOP, so ~1.5 s an epoch alone and ~6 s for the 10 fused members (results/bench/
# train_throughput_cpu_paper.json is the CPU's: 668 frames/s, 6 min an epoch: why no CPU run).
# Decoding: the baseline's lattices took 30 s on 2 CPU cores (RTF 0.044, test + valid); with
# jobs.nj = 16, ~5 s a system.
#   step        what                                                        expected s
#   (setup)     tools/offline_env.sh: wheels aside, the prepared AN4 unpacked         15
#   check       the imports, the GPU seen                                              5
#   bench       batch 1024, 4096, 16384: trainer, bare bound, 10 fused / sequential,
#               student with the teacher on the fly (10 steps, best of 3)             60
#   paper 0-2   link the prepared outputs; bf16 check and schedule sweep; baseline 8x2560;
#               decode; report                                                       100
#   paper 3     2 more baseline seeds, 10 fused members, soft targets T=2, 3 students,
#               decode 16 systems, Table 1                                            300
#   paper 4     the levers' report (no patient student at this budget)                   5
#   paper 5     3% of train: hard, soft (100% model, ensemble), 30 epochs; decode       30
#   total                                                                            ~500
# The distillation is the paper's Table 1 alone (T = 2, dense soft targets, 3 seeds of baseline
# and student): run_paper.sh's T = 5, patient student and 3% seeds would double stage 3.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 OUT [--wheels DIR] [--prepared DIR] [--stop-stage N] [--dry-run] [-- overrides...]" >&2; exit 1; }
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
wheels= prepared= stop_stage=5 dry_run=
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --prepared) prepared=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --dry-run) dry_run=--dry-run; shift ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1" >&2; exit 1 ;;
  esac
done
for dir in ${wheels:+"$wheels"} ${prepared:+"$prepared"}; do
  [ -d "$dir" ] || { echo "$0: $dir is not a directory (see this script's header for how it is made)" >&2; exit 1; }
done
wheels=${wheels:+$(cd "$wheels" && pwd)} prepared=${prepared:+$(cd "$prepared" && pwd)}
cd "$root"
if [ -z "${GPU_PAPER_RUN_SINCE:-}" ]; then  # once: the wheels installed aside and the prepared outputs unpacked (tools/offline_env.sh), then again
  export GPU_PAPER_RUN_SINCE=$(date +%s.%N)
  exec tools/offline_env.sh ${wheels:+--wheels "$wheels"} ${prepared:+--prepared "$prepared" recipes/an4} \
    bash "$root/tools/gpu_paper_run.sh" "$out" --stop-stage "$stop_stage" $dry_run -- "$@"
fi
exec > >(tee -a "$out/run.log") 2>&1
export PYTHONUNBUFFERED=1
echo "$(date '+%F %T') wheels and prepared outputs in place in $(python3 -c "import time; print(round(time.time() - $GPU_PAPER_RUN_SINCE))") s"

steps_json=$out/steps.json
echo '{}' > "$steps_json"
step() {  # step NAME COMMAND...: run it, log and record its status and seconds; later steps run whatever it gave
  local name=$1 start status seconds; shift
  start=$(date +%s.%N)
  echo "$(date '+%F %T') == $name: $*"
  "$@"; status=$?
  seconds=$(python3 - "$steps_json" "$name" "$status" "$start" <<'EOF'
import json, os, sys, time
path, name, status, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
steps = json.load(open(path))
steps[name] = {"status": status, "seconds": round(time.time() - start, 1)}
with open(path + ".tmp", "w") as f:
    json.dump(steps, f, indent=1)
os.replace(path + ".tmp", path)
print(steps[name]["seconds"])
EOF
)
  echo "$(date '+%F %T') == $name: exit $status in $seconds s"
  snapshot
  return "$status"
}

snapshot() {  # results/an4_paper and the small records of exp_paper, into OUT/an4_paper.tar (renamed whole)
  local files
  files=$( { [ -d results/an4_paper ] && echo results/an4_paper
             ls recipes/an4/exp_paper/dnn/*/{history,stage}.json recipes/an4/exp_paper/dnn/*/*/{history,stage}.json \
                recipes/an4/exp_paper/decode/*/{wer,stage}.json 2>/dev/null; } )
  [ -n "$files" ] || return 0
  # shellcheck disable=SC2086
  tar -cf "$out/.an4_paper.tar.tmp" $files 2>/dev/null && mv -f "$out/.an4_paper.tar.tmp" "$out/an4_paper.tar"
}

check() {  # what the run needs imports (the Kaldi wheels in this order), and the GPU is seen (a dry run: none needed)
  nvidia-smi -L 2>/dev/null
  python3 -c "import kaldi_hmm_gmm, kaldi_decoder, kaldifst, torch, asrkd; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
assert torch.cuda.is_available() or '$dry_run', 'torch sees no GPU: the paper-size run would take days here (--dry-run runs on a CPU)'"
}

( while sleep 30; do snapshot; done ) >/dev/null 2>&1 &  # not on the log's pipe: a sleep left behind would hold it open
snapshots=$!
trap 'kill $snapshots 2>/dev/null; snapshot' EXIT

nj=$(nproc)
bench_args=(--batch-sizes 1024 4096 16384 --members 10 --steps 10)
[ -z "$dry_run" ] || bench_args=(--batch-sizes 64 --members 2 --steps 1)
[ -z "$dry_run" ] || export ASRKD_PAPER_ANY_CPU=1  # a dry run on a CPU is the point: run_paper.sh's machine check lets it through
# run_paper.sh's Table 1 cut to this call's budget (T = 2 alone, no patient student, one seed of each 3% row);
# the overrides given here follow (a dry run's model=tiny)
paper_overrides=(train.bf16_autocast=true "jobs.nj=$nj" 'distill.temperatures=[2]' 'distill.students.dense=[2]'
                 'levers.student_epochs=[]' three_percent.seeds=1 "$@")
paper() {  # paper FIRST LAST: run_paper.sh's stages FIRST..LAST, or nothing past --stop-stage
  [ "$1" -le "$stop_stage" ] || return 0
  recipes/an4/run_paper.sh --publish --stage "$1" --stop-stage "$(( $2 < stop_stage ? $2 : stop_stage ))" -- "${paper_overrides[@]}"
}

step check check || exit 1
step bench python3 bench/train_throughput.py --exp-dir recipes/an4/exp --out "$out/train_throughput.json" \
  --profile "$out/train_throughput.profile.txt" "${bench_args[@]}" model=paper train.bf16_autocast=true "$@"
if step paper-0-2 paper 0 2; then  # the schedule and the baseline: the other stages need them
  step paper-3 paper 3 4
  step paper-5 paper 5 5
fi
echo "$(date '+%F %T') done: $(tr -d '\n ' < "$steps_json")"

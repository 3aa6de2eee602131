#!/usr/bin/env bash
# The CPU benchmark stored in benchmarks/results/ (see benchmarks/README.md): LIF first (its peers are snntorch
# and norse), then the rate networks (voltage-form e-prop and RFLO), each into its own JSON, then the tables.
# Usage: bash benchmarks/run_cpu.sh [PROFILE] [THREADS] [LIF_HIDDEN] [RATE_HIDDEN] [BATCH] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-loihi-like}"
threads="${2:-2}"
lif_hidden="${3:-256,512}"
rate_hidden="${4:-512,1024}"
batch="${5:-1,16,64}"
repeats="${6:-5}"
for model in lif rate; do
    out="benchmarks/results/cpu-${model}-${profile}-t${threads}"
    recal=""; [ "$model" = lif ] && recal="--recalibrate"
    hvar="${model}_hidden"
    python -m neuroinit.cli bench --profile "$profile" --model "$model" --threads "$threads" --hidden "${!hvar}" \
        --batch "$batch" --repeats "$repeats" --steps 100 $recal --json "$out.json" > "$out.txt" 2> "$out.log"
done
python benchmarks/render.py benchmarks/results/cpu-*-"${profile}"-t"${threads}".json \
    > "benchmarks/results/cpu-${profile}-t${threads}.md"

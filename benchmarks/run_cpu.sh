#!/usr/bin/env bash
# The CPU benchmark stored in benchmarks/results/ (see benchmarks/README.md), ~5-8 min on 2 cores:
#   1. LIF N=256, B=1,16,64, every method (the peer margins of issue 16; the plain-PyTorch fallback shown here
#      only), recalibrating, with memory vs T;
#   2. LIF N=512, B=64 (the roofline target at N >= 512, B = 64);
#   3. rate networks (voltage-form e-prop and RFLO) at N=512,1024, B=16,64 (the RFLO roofline targets);
#   4. the chip-precision rows at N=256, B=16,64, LIF and RFLO, under PROFILE and under reckon-like (int16 traces),
#      against the float fused row and the peers (the chip targets of issue 16);
#   5. adaptive LIF at N=256, B=16: its recorded online path (neuroinit-recorded) and the step-by-step one against
#      autograd e-prop, BPTT and norse's LSNN;
# then renders the JSON files into one page. Runs 2 and 3 leave out neuroinit-torch (the plain-PyTorch fallback:
# 10-15 s per trial at N=512, B=64, no target depends on it). Run it again after an interruption: each invocation
# continues from its OUT.partial.jsonl (neuroinit bench --resume), keeping the configurations already timed.
# THREADS: "best" (default: every method at one thread and at all CPUs, the faster reported with its count) or
# a comma-separated list of counts (every method at each, side by side).
# The files are named after the CPU they came from (vendor-family-model, e.g. amd-25-1 for an AMD EPYC Zen 3;
# MACHINE=... overrides it): results from different CPUs sit side by side.
# Usage: bash benchmarks/run_cpu.sh [PROFILE] [THREADS] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
profile="${1:-loihi-like}"
threads="${2:-best}"
repeats="${3:-5}"
machine="${MACHINE:-$(python -c 'from neuroinit._util import cpu_slug; print(cpu_slug())')}"
tag="cpu-${machine}-${profile}-t${threads//,/-}"
no_torch="neuroinit-fused,autograd-eprop,neuroinit-bptt,bptt,snntorch-bptt,norse-bptt"
chip_methods="neuroinit-fused,autograd-eprop,snntorch-bptt,norse-bptt"
run() {  # NAME then bench options (a later --profile overrides PROFILE); an interrupted run is continued
    local out="benchmarks/results/${tag}-$1"; shift
    local resume=()
    [[ -e "$out.json.partial.jsonl" ]] && resume=(--resume)
    python -m neuroinit.cli bench --profile "$profile" --threads "$threads" --repeats "$repeats" --steps 100 \
        "$@" --json "$out.json" "${resume[@]}" > "$out.txt" 2> "$out.log"
}
run lif256 --model lif --hidden 256 --batch 1,16,64 --recalibrate
run lif512 --model lif --hidden 512 --batch 64 --methods "$no_torch" --no-memory-scaling
run rate --model rate --hidden 512,1024 --batch 16,64 --methods "$no_torch"
run chip-rflo256 --model rate --hidden 256 --batch 16,64 --methods "$chip_methods" --no-memory-scaling
run chip-reckon256 --model both --hidden 256 --batch 16,64 --methods "$chip_methods" --no-memory-scaling \
    --profile reckon-like
run alif256 --model alif --hidden 256 --batch 16 --methods "neuroinit-fused,neuroinit-torch,autograd-eprop,bptt,norse-bptt" \
    --no-memory-scaling
python benchmarks/render.py "benchmarks/results/${tag}-lif256.json" "benchmarks/results/${tag}-lif512.json" \
    "benchmarks/results/${tag}-rate.json" "benchmarks/results/${tag}-chip-rflo256.json" \
    "benchmarks/results/${tag}-chip-reckon256.json" "benchmarks/results/${tag}-alif256.json" \
    > "benchmarks/results/${tag}.md"

#!/usr/bin/env bash
# The small-scale replication of the paper's comparison, on a CPU (README, "Results").
#
#   bash study.sh      # ~40 minutes on a shared 2-core CPU; run it again to resume (finished runs are kept)
#
# Part A, Shakespeare in the bytes encoding (V = 257): input codes fixed_min, affine and learned, and
#   the ablations: fixed_min with {0,1} bits instead of {-1,+1}, with code_scale 0.5 and 2, and a frozen
#   random Gaussian table (frozen_random: fixed but not minimal). Model and budget: config/study_shakespeare.py.
# Part B, V = 65,536 on the corpus of `python prepare.py`: fixed_min, affine, learned (config/study_pydoc.py).
# Every variant runs with seeds 1, 2, 3. A seed sets the init and the data order (seed) and the code's own
# random draw (code_seed = seed: affine's A and b, frozen_random's table), so the three affine runs use
# three different random affine maps. Runs go to out-study/, tables to out-study/*.md, figures to assets/.
set -euo pipefail
cd "$(dirname "$0")"
# One thread per run: on our shared 2-core machine, two threads per run were 5x slower than one (busy cores).
CORES=$(nproc --all)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS="1 2 3"

run() {  # run PART NAME SEED [train.py overrides]: train, then evaluate on all of val.bin
    local part=$1 name=$2 seed=$3
    shift 3
    local out=out-study/$part/$name-seed$seed
    [ -f "$out/eval.json" ] && return  # finished in an earlier call
    rm -rf "$out" && mkdir -p "$out"
    python train.py "config/study_$part.py" --out_dir="$out" --seed="$seed" --code_seed="$seed" "$@" \
        > "$out/train.log" 2>&1 || { echo "error: training $out failed, see $out/train.log" >&2; exit 1; }
    python eval.py --out_dir="$out" 2>> "$out/train.log"
}

echo "$(lscpu | sed -n 's/^Model name: *//p'), $CORES cores, OMP_NUM_THREADS=$OMP_NUM_THREADS," \
     "$(python -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")')"
python prepare.py --input=assets/tinyshakespeare.txt.gz --encoding=bytes --dataset=study_shakespeare_bytes
python prepare.py --dataset=study_pydoc

for seed in $SEEDS; do
    for code in fixed_min affine learned; do
        run shakespeare "$code" "$seed" --input_code="$code"
    done
done
for seed in $SEEDS; do
    run shakespeare fixed_min-binary "$seed" --input_code=fixed_min --code_values=binary
    run shakespeare fixed_min-scale0.5 "$seed" --input_code=fixed_min --code_scale=0.5
    run shakespeare fixed_min-scale2 "$seed" --input_code=fixed_min --code_scale=2
    run shakespeare frozen_random "$seed" --input_code=frozen_random
done
for seed in $SEEDS; do
    for code in fixed_min affine learned; do
        run pydoc "$code" "$seed" --input_code="$code"
    done
done

python report.py out-study/shakespeare/*/ --plot assets/study_shakespeare.png | tee out-study/shakespeare.md
python report.py out-study/pydoc/*/ --plot assets/study_pydoc.png | tee out-study/pydoc.md
echo "study done in $((SECONDS / 60)) min $((SECONDS % 60)) s"

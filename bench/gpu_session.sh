#!/usr/bin/env bash
# The GPU measurements, any set of parts per device call, run from the repository root.
# Carry data/dev_run, built on any machine by
# `python -m bench.train_dev_run --workdir data/dev_run --prepare-only`, and .carry/whl
# (bench/NOTES.md has the command that fills it and each call's exact arguments).
#   bash bench/gpu_session.sh [fusedmlp] [muon] [throughput] [A/B parts below] [dev runs below]
# (default: throughput dev, about 8 minutes cold: each compiles the record step for about
# 200 s; dev runs last, so a slow compile cuts it, not the throughput figures). The
# compile caches live in data/ (git-ignored), which a warm machine keeps between calls: a
# later call recompiles only what changed. A/B parts, each a train key set on the record
# profile, against `throughput`: f32residual (the float32 residual stream), tunekernels
# (Inductor's coordinate-descent tuning), autotune (max-autotune-no-cudagraphs: a long
# compile, run it alone), expandable (the allocator's expandable segments), fusedmlpstep
# (the fused Triton MLP, whose kernels `fusedmlp` times against cuBLAS), fusedcestep (the
# Triton loss), mixorder (Inductor's mix-order reductions back on), docmask against
# docmaskoff (document masking by FlexAttention on 1,000-token documents), seedgptj,
# seedbigram, seedgatedvres (issue 23's seed switches: GPT-J lanes, BigramHash 2,048,
# the gated value residual); reference
# (profiles/pr1477_8xh100.yaml, the reference system of issue #4's targets). Dev runs:
# devdocmask, devf32residual, devfusedmlp and devfusedce against dev (same curve, no
# recompiles). Into $OUT (or bench/out): session.log (all output), each part's JSON
# result and the throughput's two profiler tables; at most 8 files, the device tool's
# limit. Each part has its own time limit, so a failure in one still leaves the others'.
set -u
OUT=${OUT:-bench/out}
PARTS=${*:-throughput dev}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
export TORCHINDUCTOR_CACHE_DIR=$PWD/data/inductor_cache TRITON_CACHE_DIR=$PWD/data/triton_cache
has() { [[ " $PARTS " == *" $1 "* ]]; }
# part NAME RESULT_JSON TIMEOUT CMD...: runs CMD if NAME was asked for, and ships its result
# only if this run wrote it (newer than a mark made just before), never a stale one.
part() {
    local name=$1 json=bench/results/$2 limit=$3 mark; shift 3
    has "$name" || return 0
    mark=$(mktemp) && touch -d "1 second ago" "$mark"  # timestamps can be coarse
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v "^train:\|^score\|Warning"
    if [[ "$json" -nt "$mark" ]]; then cp "$json" "$OUT/"; else echo "no new result: $json"; fi
    rm -f "$mark"
}
# Wheels carried in .carry/whl (brotli, zstandard: the device machine has neither) go into the
# interpreter's own site-packages where pip may write there, since the isolated run of the
# exported script (`python -I`) ignores PYTHONPATH; else into /tmp/site on PYTHONPATH.
if compgen -G ".carry/whl/*.whl" >/dev/null; then
    pip_flags=(-q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
    python3 -m pip install "${pip_flags[@]}" --break-system-packages .carry/whl/*.whl 2>/dev/null \
        || { python3 -m pip install "${pip_flags[@]}" --target /tmp/site .carry/whl/*.whl \
             && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; }
    python3 -c "import brotli, zstandard; print('brotli', brotli.__version__, 'zstandard', zstandard.__version__)"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
RECORD=profiles/record_8xh100.yaml
part fusedmlp fused_mlp.json 200 python3 -m bench.fused_mlp
part muon muon_shard.json 120 python3 -m bench.muon_shard --profile $RECORD  # the optimizer step, whole and one of 8 shares
# the exported train_gpt.py alone against the pipeline's functions (issue 22): two compiles of the record step;
# fit_bytes off: a 20-step model's artifact is over the cap and its search would repack it many times
# (the quantize part measures fit_bytes); evaluation eager: its compile would add two more (evalspeed times it);
# row layout only: the profile's four layouts would add about 35 s of packing to each side
part export export.json 560 python3 -m bench.export --profile $RECORD --workdir data/dev_run --steps 20 \
    --set quantize.fit_bytes=0 --set evaluate.compile=false --set 'quantize.layouts=[row]'
part throughput train_throughput.json 280 python3 -m bench.train_throughput --profile $RECORD --trace "$OUT/trace.txt"
part reference train_throughput_pr1477.json 280 python3 -m bench.train_throughput \
    --profile profiles/pr1477_8xh100.yaml --out bench/results/train_throughput_pr1477.json
# ab NAME LIMIT ARGS...: an A/B run of bench.train_throughput, its JSON named after the part
ab() { local name=$1 limit=$2; shift 2
    part "$name" "train_throughput_$name.json" "$limit" python3 -m bench.train_throughput --profile $RECORD \
        --out "bench/results/train_throughput_$name.json" "$@"; }
ab f32residual 280 --set model.low_precision_residual=false
ab tunekernels 500 --set runtime.compile_tune_kernels=true
ab docmask 300 --set model.doc_mask=true --doc-len 1000
ab docmaskoff 280 --doc-len 1000
ab autotune 560 --set runtime.compile_mode=max-autotune-no-cudagraphs
ab fusedmlpstep 280 --set runtime.fused_mlp=true
ab fusedcestep 280 --set runtime.fused_ce=true
ab mixorder 280 --set runtime.compile_mix_order_reduction=true --trace "$OUT/trace_mixorder.txt"  # traces name the kernels
# issue 23: the seeds' switches on the record model (throughput only; their CPU val_bpb is in the issue's note)
ab seedgptj 280 --set model.parallel_mode=gptj
ab seedbigram 280 --set model.bigram_buckets=2048
ab seedgatedvres 280 --set model.value_residual=true --set model.value_residual_mode=gated
part expandable train_throughput_expandable.json 280 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    python3 -m bench.train_throughput --profile $RECORD --out bench/results/train_throughput_expandable.json
# dev NAME JSON ARGS...: the short real run on the dev corpus (75 steps of 131,072 tokens)
dev() { local name=$1 json=$2; shift 2
    part "$name" "$json" 300 python3 -m bench.train_dev_run --profile $RECORD --workdir data/dev_run \
        --batch-tokens 131072 --steps 75 --out "bench/results/$json" "$@"; }
dev dev train_dev_run.json
# quantize: the record-size model trained once on the dev corpus (EMA off, one epoch at most),
# Hessians collected as one rank of the record run would, then RTN and GPTQ on the same grid,
# GPTQ + LQER, and GPTQ alone against GPTQ + LQER + int8 gate pruned to 15,950,000 bytes with code;
# non-overlapping windows only (at b440bab sliding damage was within 0.0001 of theirs; a sliding
# window at stride 64 costs 32x the compute per token, and that run was cut at 420 s after GPTQ)
# The JSON is rewritten after every variant, so a cut keeps what was measured; fit first (the
# profile's artifact, which the eval parts below read), LQER alone last; then the record profile's
# layouts one at a time (row is GPTQ's own pack), bytes per group: which layout wins which group.
part quantize quantize.json 270 python3 -m bench.quantize --profile profiles/record_1xh100.yaml \
    --workdir data/dev_run --steps 75 --layouts row+shuffle,col+shuffle,col+nn+shuffle --variants fit lqer \
    --no-sliding --no-lite
# the record profile's quantization, GPTQ + LQER + int8 gate pruned to 15,950,000 bytes with code in
# the row layout (bench.quantize packs every variant in row alone, so it is pruned at least as much
# as the profile's own artifact), or GPTQ alone, unpruned, where the quantize part was cut before it
ARTIFACT=data/dev_run/model_gptq_lqer_gate_fit.bin
[[ -f $ARTIFACT ]] || ARTIFACT=data/dev_run/model_gptq.bin
# evaleager (in the quantize call): the record's final mode and sliding on that artifact, eager, over
# the first 200,000 dev val tokens: the TTT gain on the record-size model, and the eager speed to set
# against the b440bab figure (1,408 tok/s) and against evalspeed's compiled one
part evaleager eval_speed_eager.json 200 python3 -m bench.eval_speed --profile $RECORD --device cuda \
    --artifact $ARTIFACT --shards data/dev_run/shards_8192 --tokenizer data/dev_run/tokenizer_8192 \
    --tokens 200000 --modes ttt_phased sliding --set compile=false --out bench/results/eval_speed_eager.json
# quantizesearch (after quantize, on its weights): GPTQ-lite beside RTN and GPTQ, and GPTQ with
# SDClip's k searched per category within 15,950,000 bytes with code (one GPTQ and one pack per
# candidate k; brotli only, the codec that won every group so far, to keep the packs short)
part quantizesearch quantize_search.json 420 python3 -m bench.quantize --profile profiles/record_1xh100.yaml \
    --workdir data/dev_run --reuse --layouts '' --variants search_bytes --no-sliding \
    --set 'compressors=[brotli]' --out bench/results/quantize_search.json
# evalspeed (after quantize, in a call of its own: each mode compiles its graphs in its warm-up):
# the record's final mode first (a call cut by its limit keeps it), then sliding, on that
# artifact (ttt_sgd projected 420 s eager already), over the first 200,000 dev val tokens,
# compiled as the record profile says: tokens/s, the 8xH100 projection and val_bpb of the slice
part evalspeed eval_speed.json 300 python3 -m bench.eval_speed --profile $RECORD --device cuda \
    --artifact $ARTIFACT --shards data/dev_run/shards_8192 \
    --tokenizer data/dev_run/tokenizer_8192 --tokens 200000 --modes ttt_phased sliding
# evalspeedwhole (a call of its own): the final mode with the batch's 64 rows in one forward
# (lora_group_rows 0); its peak_mem_mib says whether that fits an H100's 80 GB, so that the
# record profile can drop its groups of 32 (bench/NOTES.md)
part evalspeedwhole eval_speed_whole.json 540 python3 -m bench.eval_speed --profile $RECORD --device cuda \
    --artifact $ARTIFACT --shards data/dev_run/shards_8192 \
    --tokenizer data/dev_run/tokenizer_8192 --tokens 200000 --modes ttt_phased --set lora_group_rows=0 \
    --out bench/results/eval_speed_whole.json
# evalphaseseager (after quantize, in its call: `quantize evalphaseseager`): the final mode compiled with its global SGD phases
# eager (evaluate.compile_phases=false): no SGD-step graph in the warm-up, the phases at eager speed;
# set against evalspeed's ttt_phased projection
part evalphaseseager eval_speed_eager_phases.json 300 python3 -m bench.eval_speed --profile $RECORD --device cuda \
    --artifact $ARTIFACT --shards data/dev_run/shards_8192 \
    --tokenizer data/dev_run/tokenizer_8192 --tokens 200000 --modes ttt_phased --set compile_phases=false \
    --out bench/results/eval_speed_eager_phases.json
dev devdocmask train_dev_run_docmask.json --set model.doc_mask=true
dev devf32residual train_dev_run_f32residual.json --set model.low_precision_residual=false
dev devfusedmlp train_dev_run_fusedmlp.json --set runtime.fused_mlp=true
dev devfusedce train_dev_run_fusedce.json --set runtime.fused_ce=true
ls -la "$OUT"

#!/usr/bin/env bash
# One-seed screen of the translation diagnosis (docs/RESULTS.md): the Bible Fr->En configs, 400 steps of
# length-bucketed batches (--data.max_tokens 1400), seed 1337, validation NLL over the whole split, gradient norms
# every 50 steps. A finished run is skipped; an unfinished one starts again. Name arms to run only those (two
# instances with disjoint arms use both cores). Then its CSV and table:
#
#     bash benchmarks/mt_screen.sh [OUT [ARM ...]]    # OUT defaults to runs/mt_screen; one thread, 20-40 min a run
#     python -m benchmarks.collect_runs OUT --out docs/results/mt_screen.csv --reference euler \
#         --scalars 'iiet/increment/enc*' 'iiet/contraction/enc*' 'grad/enc*'
#     python -m benchmarks.results
set -euo pipefail
out=${1:-runs/mt_screen}
shift || true
selected=" $* "
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
  local name=$1 encoder=$2
  shift 2
  [ "$selected" = "  " ] || [[ "$selected" == *" $name "* ]] || return 0
  [ -f "$out/$name/done" ] && return 0
  rm -rf "${out:?}/$name"
  mkdir -p "$out/$name"
  # the screen's arms add their options to an encoder without the branch scale that the configs ship since 2026-12-05
  local cmd=(python -m lit_iiet fit --config conf/mt/bible_fr_en.yaml --config "conf/encoder/$encoder.yaml"
    --model.enc_ode "{branch_scale: null}" "$@" --data.max_tokens 1400
    --trainer.max_steps 400 --trainer.val_check_interval 200 --model.val_decode_batches 0
    "--trainer.callbacks+=lit_iiet.callbacks.GradientNorms" --trainer.callbacks.every_n_steps=50)
  printf '%q ' "${cmd[@]}" | sed 's/ $/\n/' > "$out/$name/command.txt"
  "${cmd[@]}" --trainer.enable_progress_bar false --trainer.default_root_dir "$out/$name" > "$out/$name.log" 2>&1
  touch "$out/$name/done"
}
run euler euler
run iiet iiet
run iiet_branch_scale iiet --model.enc_ode.branch_scale 0.1
run iiet_gpt2_init iiet --model.arch.init gpt2
run euler_branch_scale euler --model.enc_ode.branch_scale 0.1
run looped iiet --model.enc_ode.scheme looped
run euler_gpt2_init euler --model.arch.init gpt2
run iiet_shared_dropout iiet --model.enc_ode.dropout_mask layer
run iiet_decoder iiet --model.dec_ode.scheme iiet --model.dec_ode.iters 3
run iiet_r2 iiet --model.enc_ode.iters 2
run iiet_branch_scale_both iiet --model.enc_ode.branch_scale 0.1 --model.dec_ode.branch_scale 0.1
run iiet_learned_relaxation iiet --model.enc_ode.iiet.relaxation learned

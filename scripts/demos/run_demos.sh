#!/usr/bin/env bash
# The digits demos over seeds: every number the README and docs/methods/*.md give for a digits demo comes from this
# script (lightning-methods grid / select, then lightning-methods table), not typed by hand.
#
#   scripts/demos/run_demos.sh                      # every demo, seeds 0 1 2 3 4, one thread each
#   scripts/demos/run_demos.sh quickstart multibit  # some of them
#   SEEDS="0 1 2" OMP_NUM_THREADS=2 DEMO_DIR=runs/demos_2t scripts/demos/run_demos.sh hpn
#   TABLES_ONLY=1 scripts/demos/run_demos.sh        # only the tables again, from the finished runs
#
# Demos: quickstart, multibit (EMQ and LSQ vs Any-Precision), hpn (task-weight sweep), early_cutting (select vs
# plain CE), tunnel (MLP + TunnelProbe), ood (EncMin2L vs single encoders, AUROC x 100), fedfree (FedFree and the HmFL
# baselines FedAvg, FedProx, Per-FedAvg, pFedLA vs Local-only), fedfree_skew (the same with 2 classes per client, the
# paper's label-skew regime), sam (SAM, SAM-ON, ASAM-ON vs SGD), sam_long (SGD, SAM, SAM-ON in 30 epochs), koala
# (KOALA-M, KOALA++ vs SGD, Adam), distillation (KD, DKD, KD+DeepKD, DKD+DeepKD vs the student alone), threads (seed 0
# of each demo again with 2 threads,
# into $DEMO_DIR/threads2/).
# Output per demo: $DEMO_DIR/<demo>/table.md + table.csv (mean +- std over seeds, from `lightning-methods table`;
# with --baseline: the difference to the baseline row and whether it is beyond the seed spread, baseline.csv),
# the runs (each with results.json: versions, device incl. CPU model and thread count, wall time), and one line per
# demo in $DEMO_DIR/times.tsv: wall and CPU seconds of the whole demo and the 1-minute load average before and after.
# Runs that finished are skipped when the script is run again (grid and select resume).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${DEMO_DIR:-runs/demos}
SEEDS=${SEEDS:-"0 1 2 3 4"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$OUT"
[ -f "$OUT/times.tsv" ] || printf 'demo\tthreads\twall_s\tcpu_s\tload1_before\tload1_after\tcpu\n' > "$OUT/times.tsv"

load1() { cut -d' ' -f1 /proc/loadavg; }
cpu_name() { grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'; }

# timed NAME CMD...: run CMD, append its wall / CPU time (children included) and the load average to times.tsv
timed() {
  local name=$1; shift
  [ "${TABLES_ONLY:-0}" = 1 ] && return 0
  local before; before=$(load1)
  local tfile; tfile=$(mktemp)
  /usr/bin/time -f '%e %U %S' -o "$tfile" "$@"
  read -r wall user sys < "$tfile"; rm -f "$tfile"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$OMP_NUM_THREADS" "$wall" \
    "$(python -c "print(round($user + $sys, 1))")" "$before" "$(load1)" "$(cpu_name)" >> "$OUT/times.tsv"
}

table() {  # table DIR RUNS... -- METRICS... [-- TABLE OPTIONS (--baseline NAME ...)]
  local dir=$1; shift
  local runs=(); while [ "$1" != "--" ]; do runs+=("$1"); shift; done; shift
  local metrics=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do metrics+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  lightning-methods table "${runs[@]}" --output "$dir" --metrics "${metrics[@]}" --no_plot "$@"
}

demo_quickstart() {
  timed quickstart lightning-methods grid --config configs/quickstart.yaml --seeds $SEEDS --grid_dir "$OUT/quickstart"
  table "$OUT/quickstart" "$OUT/quickstart" -- test/acc best/val/acc
}

demo_multibit() {
  timed multibit lightning-methods grid --config configs/quantization/digits_emq.yaml \
    configs/quantization/digits_anyprecision.yaml configs/quantization/digits_lsq.yaml --seeds $SEEDS \
    --grid_dir "$OUT/multibit"
  table "$OUT/multibit" "$OUT/multibit" -- test/acc_bit1 test/acc_bit2 test/acc_bit3 test/acc_bit4 test/acc_bit8 \
    test/acc_bit32 -- --baseline digits_anyprecision
  python scripts/demos/multibit_cost.py "$OUT/multibit" | tee "$OUT/multibit/cost.md"
}

demo_hpn() {
  timed hpn lightning-methods grid --config configs/hpn/digits_multitask.yaml \
    --set model.init_args.task_weight=0.01,0.1,0.25,0.5,0.9 --seeds $SEEDS --grid_dir "$OUT/hpn"
  table "$OUT/hpn" "$OUT/hpn" -- test/acc test/mae -- --baseline task_weight=0.25  # the paper's choice of t
}

demo_early_cutting() {
  local s
  for s in $SEEDS; do
    timed "early_cutting_select_seed$s" lightning-methods select --config configs/noisy_labels/digits_sym40.yaml \
      --seed_everything "$s" --data.init_args.seed "$s" --run_dir "$OUT/early_cutting/select/seed$s" \
      --trainer.logger.init_args.save_dir "$OUT/early_cutting/wandb"
  done
  timed early_cutting_ce lightning-methods grid --config configs/noisy_labels/digits_sym40_ce.yaml --seeds $SEEDS \
    --grid_dir "$OUT/early_cutting/ce"
  table "$OUT/early_cutting" "$OUT/early_cutting/select" "$OUT/early_cutting/ce" -- test_acc_last test/acc \
    test_acc_at_best_val -- --baseline digits_sym40_ce --baseline_metric test/acc
}

demo_tunnel() {
  timed tunnel lightning-methods grid --config configs/tunnel/digits_mlp.yaml --seeds $SEEDS --grid_dir "$OUT/tunnel"
  python scripts/demos/tunnel_summary.py "$OUT/tunnel" | tee "$OUT/tunnel/summary.md"
}

demo_ood() {  # EncMin2L against each encoder alone (its level-1 gate) on the union of shifts, and per shift type
  timed ood lightning-methods grid --command ood --config configs/ood/digits_demo.yaml --seeds $SEEDS \
    --grid_dir "$OUT/ood"
  local d m metrics=()
  for d in EncMin2L 'L1[cnn]' 'L1[rand_timm]' Monolithic-RDM 'Mahalanobis[cnn]'; do
    metrics+=("ood/$d/union/auroc")
  done
  for m in near far covariate; do
    for d in EncMin2L 'L1[cnn]' 'L1[rand_timm]' Monolithic-RDM 'Mahalanobis[cnn]'; do
      metrics+=("ood/$d/${m}_mean/auroc")
    done
  done
  table "$OUT/ood" "$OUT/ood" -- "${metrics[@]}"
}

demo_fedfree() {  # FedFree and the HmFL baselines vs Local-only, final-round mean client accuracy (fractions of 1)
  timed fedfree lightning-methods grid --command fed --config configs/federated/digits_demo.yaml --seeds $SEEDS \
    --grid_dir "$OUT/fedfree"
  table "$OUT/fedfree" "$OUT/fedfree" -- final_mean final_std best_weighted -- --baseline digits_demo:local
}

demo_fedfree_skew() {  # the same in the paper's regime (non-IID1: pathological label skew), 2 of the 10 classes each
  timed fedfree_skew lightning-methods grid --command fed --config configs/federated/digits_demo.yaml \
    --set data.partition.classes_per_client=2 --seeds $SEEDS --grid_dir "$OUT/fedfree_skew"
  # every algorithm against FedFree, seed by seed (one seed: the same partition and client initialisations for all)
  table "$OUT/fedfree_skew" "$OUT/fedfree_skew" -- final_mean final_std best_weighted -- \
    --baseline digits_demo:fedfree --paired
}

demo_sam() {  # SAM, SAM-ON and ASAM-ON vs SGD (one seed: the same split and initialisation for every optimizer)
  timed sam lightning-methods grid --config configs/sam/digits_sgd.yaml configs/sam/digits_sam.yaml \
    configs/sam/digits_samon.yaml configs/sam/digits_asamon.yaml --seeds $SEEDS --grid_dir "$OUT/sam"
  table "$OUT/sam" "$OUT/sam" -- test/acc last/val/acc -- --baseline digits_sgd --paired
}

demo_sam_long() {  # SGD, SAM and SAM-ON again with a 30-epoch schedule: does the budget decide the SAM demo?
  timed sam_long lightning-methods grid --config configs/sam/digits_sgd.yaml configs/sam/digits_sam.yaml \
    configs/sam/digits_samon.yaml --seeds $SEEDS --grid_dir "$OUT/sam_long" -- --trainer.max_epochs 30 \
    --model.init_args.lr_scheduler.init_args.T_max 30
  table "$OUT/sam_long" "$OUT/sam_long" -- test/acc last/val/acc -- --baseline digits_sgd --paired
}

demo_koala() {  # KOALA-M and KOALA++ vs SGD and Adam (paired by seed like the SAM demo)
  timed koala lightning-methods grid --config configs/koala/digits_sgd.yaml configs/koala/digits_adam.yaml \
    configs/koala/digits_koalam.yaml configs/koala/digits_koalapp.yaml --seeds $SEEDS --grid_dir "$OUT/koala"
  table "$OUT/koala" "$OUT/koala" -- test/acc last/val/acc -- --baseline digits_sgd --paired
}

demo_distillation() {  # KD, DKD and their DeepKD versions vs the student alone; one teacher (seed 0) on one split
  local teacher="$OUT/distillation/teacher/digits_teacher/seed0/checkpoints/last.ckpt"
  timed distillation_teacher lightning-methods grid --config configs/distillation/digits_teacher.yaml --seeds 0 \
    --grid_dir "$OUT/distillation/teacher"
  # the seed sets the student's initialisation and batch order; the data seed stays 0 (the teacher's split)
  timed distillation_student lightning-methods grid --config configs/distillation/digits_student.yaml \
    --seeds $SEEDS --seed_keys seed_everything --grid_dir "$OUT/distillation/student"
  timed distillation_kd lightning-methods grid --config configs/distillation/digits_kd.yaml \
    configs/distillation/digits_dkd.yaml configs/distillation/digits_kd_deepkd.yaml \
    configs/distillation/digits_deepkd.yaml --seeds $SEEDS --seed_keys seed_everything \
    --grid_dir "$OUT/distillation/kd" -- --model.init_args.teacher_checkpoint "$teacher"
  table "$OUT/distillation" "$OUT/distillation/teacher" "$OUT/distillation/student" "$OUT/distillation/kd" -- \
    test/acc last/val/acc -- --baseline digits_student --paired
}

demo_threads() {  # seed 0 of each demo with 2 threads: how much the digits move with the thread count alone
  local t2="$OUT/threads2"  # THREAD_DEMOS picks the demos (default: all)
  local all="quickstart multibit hpn early_cutting tunnel ood fedfree sam koala distillation"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 SEEDS=0 DEMO_DIR="$t2" "$0" ${THREAD_DEMOS:-$all}
}

demos=("$@")
[ ${#demos[@]} -gt 0 ] || demos=(quickstart multibit hpn early_cutting tunnel ood fedfree fedfree_skew sam sam_long koala distillation)
for d in "${demos[@]}"; do
  echo "=== demo $d (OMP_NUM_THREADS=$OMP_NUM_THREADS, seeds $SEEDS, load $(load1)) ==="
  "demo_$d"
done

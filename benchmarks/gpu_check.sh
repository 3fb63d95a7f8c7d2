#!/usr/bin/env bash
# The prepared GPU check: everything in this repository that only a GPU can show, as one command that stops within
# a budget of 5 minutes for its steps (GPU_CHECK_BUDGET, seconds, default 300) on one H100 / H200: pass the device
# tool timeout_s=360 (the budget, the wheels' installation and the start of CUDA), which leaves a session's 15 minutes
# of device time room for the machine's start and a second call.
#
#   bash benchmarks/gpu_check.sh --prepare      # here, with pip and the registries: the wheels that the GPU
#                                               # image lacks, and this package's own wheel, into .whl/
#   bash benchmarks/gpu_check.sh [OUT]          # on the GPU machine (.whl/ carried along in the repository root);
#                                               # OUT: the folder for the results (default: $OUT, else ./gpu_check)
#   GPU_CHECK_STEPS="runs throughput" bash benchmarks/gpu_check.sh   # only these steps (of: pytest imagenet runs
#                                               # throughput), e.g. the ones a first call left undone
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh OUT   # the same steps on a CPU with tiny sizes (tests the script;
#                                               # pytest -m slow -k gpu_check runs it: do so before a GPU session)
#
# Each step runs under its own time limit, cut to what is left of the budget; a step that finds less than 15 s left
# is skipped. The summary's last line names the steps that were skipped or timed out, as the GPU_CHECK_STEPS of a
# second call. The steps come in the order of what they settle, issue 23's first.
#
# The GPU image holds torch, torchvision, lightning, timm, scikit-learn, matplotlib and pytest, but not litdata (and
# its boto3), simplejpeg, turbojpeg, jsonargparse, pytest-xdist or wandb: --prepare downloads the first ones for the
# image's Python (3.12; GPU_CHECK_PYTHON_VERSION to change) at the versions installed here; nothing in the check needs
# wandb.
#
# Steps (GPU_CHECK_STEPS names in brackets); OUT gets 8 files (what the device tool brings back at most):
#   summary.txt            the device and the versions, then one line per step: exit code and seconds
#   pytest_gpu.log         [pytest] pytest -m gpu: bf16-mixed training with SGD / SAM-ON / KOALA++, channels_last +
#                          compile, nvJPEG decoding against libjpeg-turbo (issue 23)
#   imagenet_gpu.json/.log [imagenet] benchmarks/imagenet_cases.py --gpu: ResNet-50 bf16 channels-last steps/s fed
#                          synthetic / by streaming + nvJPEG / by streaming + CPU workers (issue 23 target: pipeline
#                          under 5%)
#   runs.log               [runs] real runs of `lightning-methods`: the ImageNet photo demo (prepare-data demo,
#   runs_results.json      convert, fit through the streaming path, nvJPEG decode: the default on CUDA), then two of
#                          the papers' ImageNet configs as shipped (224 px, bf16, SAM-ON ResNet-50, Any-Precision
#                          DeiT-Tiny) for 2 steps, a validation, a checkpoint and a test on the photo classes; each
#                          run's results.json status and test metrics. The verdict is the status: two steps from
#                          scratch leave BatchNorm's running statistics near their initial values, so a ResNet-50's
#                          evaluation loss is huge or NaN (seen on the CPU with plain SGD as well: 1e35 at lr 0.1)
#   gpu.json               [throughput] benchmarks/throughput.py --gpu: docs/benchmarks.md's GPU section (bf16,
#   throughput.log         torch.compile, gpu_resident vs workers, Lightning vs the raw loop, SAM and DeepKD steps),
#                          2 rounds; the JSON records of both benchmarks are rewritten after each of their sections,
#                          so a cut keeps the sections measured
#
# Afterwards, here: copy imagenet_gpu.json and gpu.json into benchmarks/results/ (imagenet_pipeline_gpu.json,
# gpu.json), run `python benchmarks/throughput.py --write-docs docs/benchmarks.md`, and put the figures with the
# device name into docs/imagenet.md section 6.
set -uo pipefail
here=$(pwd)  # OUT and PYTHON are read from the caller's folder; the steps run in the repository root
cd "$(dirname "$0")/.." || exit 2

WHEELS=(litdata boto3 botocore s3transfer jmespath simplejpeg turbojpeg jsonargparse docstring-parser typeshed-client
        pytest-xdist execnet)  # pytest-xdist: pyproject's addopts name its -n (the GPU tests run in one process: -n 0)

if [[ "${1:-}" == "--prepare" ]]; then
    py=$(cd "$here" && realpath -s "$(command -v "${PYTHON:-python}")") \
        || { echo "gpu_check: no ${PYTHON:-python}" >&2; exit 2; }
    versions='import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))'
    pins=$("$py" -c "$versions" "${WHEELS[@]}") \
        || { echo "gpu_check: install the package and extras first (pip install -e \".[streaming]\")" >&2; exit 2; }
    rm -rf .whl build && mkdir -p .whl  # build/: no stale modules in the wheel
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl . || exit 1
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl $pins || exit 1
    ls .whl && du -sh .whl
    echo "device tool: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\".whl\"], timeout_s=360)"
    exit 0
fi

out=${1:-${OUT:-gpu_check}}
out=$(cd "$here" && mkdir -p "$out" && cd "$out" && pwd) || exit 2
summary="$out/summary.txt"
ALL_STEPS="pytest imagenet runs throughput"
wanted=" ${GPU_CHECK_STEPS:-$ALL_STEPS} "
budget=${GPU_CHECK_BUDGET:-300}
for name in $wanted; do
    [[ " $ALL_STEPS " == *" $name "* ]] \
        || { echo "gpu_check: GPU_CHECK_STEPS names '$name'; the steps are: $ALL_STEPS" | tee "$summary"; exit 2; }
done
[[ "$budget" =~ ^[0-9]+$ ]] \
    || { echo "gpu_check: GPU_CHECK_BUDGET='$budget' is not a whole number of seconds" | tee "$summary"; exit 2; }
py=$(cd "$here" && realpath -s "$(command -v "${PYTHON:-python3}")") \
    || { echo "gpu_check: no ${PYTHON:-python3}" >&2; exit 2; }
smoke=${GPU_CHECK_SMOKE:-0}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
wheels=${GPU_CHECK_WHEELS:-.whl}  # --prepare's wheels, in the repository root (none: packages installed already)
if compgen -G "$wheels/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        "$wheels"/*.whl || { echo "gpu_check: installing the wheels of $wheels/ failed" | tee "$summary"; exit 2; }
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/gpu_check_site/bin:$PATH
fi

{
    date -u "+%Y-%m-%d %H:%M:%S UTC"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" - <<'EOF'
import importlib.metadata as md, os, platform, torch
versions = []
for name in ["torch", "torchvision", "lightning", "timm", "litdata", "simplejpeg", "turbojpeg", "lightning-methods"]:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} missing")
print("python", platform.python_version(), "|", ", ".join(versions))
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print("device:", cuda, "| CPU cores:", os.cpu_count())
EOF
} > "$summary" 2>&1
cat "$summary"
if [[ "$smoke" != 1 ]] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here (GPU_CHECK_SMOKE=1 runs the steps on a CPU, tiny sizes)" | tee -a "$summary"
    exit 2
fi

t0=$(date +%s)
undone=""  # the GPU_CHECK_STEPS of a second call: steps skipped for the budget or timed out
not_done() { [[ " $undone " == *" $1 "* ]] || undone="${undone:+$undone }$1"; }  # not_done GROUP: add it once
step() {  # step GROUP NAME SECONDS LOG COMMAND...: run under a time limit cut to the budget's rest, append to LOG,
    local group=$1 name=$2 limit=$3 log=$4 start rc left  # record exit code and time
    shift 4
    start=$(date +%s)
    left=$(( budget - (start - t0) ))
    if (( left < 15 )); then
        echo "$name: skipped, ${left#-} s $( ((left < 0)) && echo over || echo left) of the budget of $budget s" \
            | tee -a "$summary"
        not_done "$group"
        return
    fi
    (( limit > left )) && limit=$left
    echo "=== $name" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - start )) s (limit $limit s)$([[ $rc == 124 ]] && echo ', TIMED OUT')" \
        | tee -a "$summary"
    if [[ $rc == 124 ]]; then not_done "$group"; fi
}

configs=(imagenet_resnet50_samon imagenet_deit_tiny_anyprecision)  # the papers' ImageNet configs, unshrunk
tests=(tests/core/test_gpu.py tests/imagenet/test_imagenet_augment.py)  # without CUDA: skipped (conftest)
if [[ "$smoke" == 1 ]]; then
    imagenet=(--images 64 --rounds 1 --batch 16)
    configs=(imagenet_resnet50_samon)
    shrink=(--data.init_args.image_size 32 --data.init_args.eval_resize 36 --data.init_args.batch_size 4
            --model.init_args.backbone imagenet_resnet18)  # the plumbing, not the config (test_configs.py)
    demo_epochs=(--trainer.max_epochs 1)
    throughput=(--mode small --sections loop)
else
    imagenet=(--gpu --images 512 --rounds 1)
    shrink=()
    demo_epochs=()
    throughput=(--gpu --rounds 2)
fi
echo "steps:$wanted| budget: $budget s" >> "$summary"
if [[ "$wanted" == *" pytest "* ]]; then
    rm -f "$out/pytest_gpu.log"
    step pytest "pytest -m gpu" 120 "$out/pytest_gpu.log" \
        env PYTHONSAFEPATH=1 "$py" -m pytest -m gpu -q -p no:cacheprovider -n 0 "${tests[@]}"
fi
if [[ "$wanted" == *" imagenet "* ]]; then
    rm -f "$out"/imagenet_gpu.{json,log}
    step imagenet "imagenet_cases.py ${imagenet[*]}" 150 "$out/imagenet_gpu.log" \
        "$py" benchmarks/imagenet_cases.py "${imagenet[@]}" --out "$out/imagenet_gpu.json"
fi

if [[ "$wanted" == *" runs "* ]]; then
    # Real runs through the CLI, each in its own folder of a scratch directory (run files land in the working folder)
    rm -f "$out"/runs{.log,_results.json}
    work=$(mktemp -d)
    data=$work/demo_photos
    cli="$py -m lightning_methods.cli"
    mkdir -p "$work/demo_photos_fit" && step runs "demo: prepare-data demo, convert, fit (streaming)" 60 \
        "$out/runs.log" bash -c "cd '$work/demo_photos_fit' && $cli prepare-data demo '$data' \
        && $cli prepare-data convert '$data' '${data}_streaming' --num_workers 1 \
        && $cli fit --config '$(pwd)/configs/imagenet/demo_photos.yaml' \
           --data.init_args.streaming '${data}_streaming' --trainer.logger false ${demo_epochs[*]}"
    for name in "${configs[@]}"; do  # 224 px, bf16, nvJPEG decode, the configs' backbones, on the 4 photo classes
        mkdir -p "$work/$name" && step runs "config $name: 2 steps, validation, checkpoint, test" 60 \
            "$out/runs.log" bash -c "cd '$work/$name' && $cli fit --config '$(pwd)/configs/imagenet/$name.yaml' \
            --data.init_args.data_dir '$data' --data.init_args.num_classes 4 --trainer.max_steps 2 \
            --trainer.limit_train_batches 2 --trainer.limit_val_batches 2 --trainer.limit_test_batches 2 \
            --trainer.logger false ${shrink[*]}"
    done
    "$py" - "$work" "$out/runs_results.json" <<'EOF'
import json, sys
from pathlib import Path
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*/results.json"))}
Path(sys.argv[2]).write_text(json.dumps({name: {"status": r.get("status"), "test": (r.get("test") or {}).get("metrics")}
                                         for name, r in runs.items()}, indent=1) + "\n")
EOF
    rm -rf "$work"
fi
if [[ "$wanted" == *" throughput "* ]]; then
    rm -f "$out"/{gpu.json,throughput.log}
    step throughput "throughput.py ${throughput[*]}" 240 "$out/throughput.log" \
        "$py" benchmarks/throughput.py "${throughput[@]}" --json "$out/gpu.json"
fi
echo "not done (skipped or timed out): ${undone:-none}$([[ -n $undone ]] \
    && echo " -> rerun: GPU_CHECK_STEPS=\"$undone\" bash benchmarks/gpu_check.sh")" | tee -a "$summary"
ls -l "$out" >> "$summary"

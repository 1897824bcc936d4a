#!/usr/bin/env bash
# One GPU check, from the repository root of a CUDA machine, in under 8 minutes:
#   the GPU and torch; the tests that use CUDA when it is there (training, the zoo, Grad-CAM, influence);
#   fastnet trained with its shipped recipe through the CLI (wall time, test accuracy); the three influence
#   indexes fitted for that fresh checkpoint, each timed, with an empty cache so nothing is reused;
#   then one markdown table. A step that fails or runs out of time reads FAILED/TIMEOUT in the table,
#   which prints whatever happened; the exit status is 0 only when every step passed.
#
#   bench/gpu_check.sh            # the check (needs torch.cuda.is_available())
#   bench/gpu_check.sh --dry-run  # no GPU needed: only checks that every command below parses
#
# CIFARVIZ_DATA: the data (default ../shared/data/cifar10-jpeg). PYTHON: the interpreter (default python).
# GPU_CHECK_BUDGET_S: seconds for all steps together (default 420); a step that would start past it is
# skipped. GPU_CHECK_ALLOW_CPU=1 runs the steps without CUDA, only to try this script's own bookkeeping
# (its TIMEOUT/FAILED rows) with a small budget. Nothing is written into the repository: the checkpoint,
# caches and runs go to a temporary folder, removed at the end except its logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
export CIFARVIZ_DATA="${CIFARVIZ_DATA:-../shared/data/cifar10-jpeg}"
export CIFARVIZ_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
TESTS=(tests/test_train.py tests/test_models.py tests/test_explore.py tests/test_influence.py)
METHODS=(head trak similarity)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cifarviz-gpu-check.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/cache" "$WORK/test-cache" "$WORK/runs" "$WORK/out"
CKPT="$WORK/out/fastnet-gpu-check.safetensors"
TRAIN_ARGS=(train --recipe fastnet --data "$CIFARVIZ_DATA" --out "$CKPT")
precompute_args() { PRE_ARGS=(precompute --data "$CIFARVIZ_DATA" -c "$CKPT" --influence "$1"); }  # sets PRE_ARGS

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T0="$(now)"
DEADLINE=$(( $(date +%s) + BUDGET ))

# the table's rows: set as the steps finish; a step that never ran keeps its default
ROW_GPU="FAILED (not checked)"
ROW_TORCH="FAILED (not checked)"
ROW_TESTS="not run"
ROW_TRAIN="not run"
declare -A ROW_INDEX=()
for m in "${METHODS[@]}"; do ROW_INDEX[$m]="not run"; done
FAILURES=0

data_label() {
  local name; name="$(basename "$CIFARVIZ_DATA")"
  if [ "$name" = "cifar10-jpeg" ]; then echo "the cifar10-jpeg copy at $CIFARVIZ_DATA"; else echo "$CIFARVIZ_DATA"; fi
}

print_table() {
  local mode=""; [ "$DRY_RUN" -eq 1 ] && mode=" (dry run: nothing was trained or fitted)"
  echo
  echo "## cifarviz GPU check$mode"
  echo
  echo "| check | result |"
  echo "|---|---|"
  echo "| GPU | $ROW_GPU |"
  echo "| torch | $ROW_TORCH |"
  echo "| tests (${TESTS[*]}) | $ROW_TESTS |"
  echo "| fastnet, shipped recipe, trained through the CLI on $(data_label) | $ROW_TRAIN |"
  for m in "${METHODS[@]}"; do echo "| $m influence index fit (fresh checkpoint, empty cache) | ${ROW_INDEX[$m]} |"; done
  echo "| total wall time | $(since "$T0") s |"
  echo
  echo "logs: $LOGS"
}

finish() {
  local rc=$?
  print_table
  rm -rf "$WORK/cache" "$WORK/test-cache" "$WORK/runs" "$WORK/out"  # keep only the logs
  if [ "$rc" -eq 0 ] && [ "$FAILURES" -gt 0 ]; then rc=1; fi
  exit "$rc"
}
trap finish EXIT

# run_step NAME LIMIT_S CMD...: runs CMD with its output in $LOGS/NAME.log (and on the terminal), at most
# LIMIT_S seconds and never past the budget. Sets STEP_RC (124: timed out, 125: skipped) and STEP_S.
run_step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  STEP_S=0
  if [ "$left" -lt 15 ]; then
    STEP_RC=125
    echo "== $name: skipped, the ${BUDGET} s budget is spent" | tee "$LOGS/$name.log" >&2
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "== $name (at most ${limit} s): $*" >&2
  local start; start="$(now)"
  STEP_RC=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || STEP_RC=$?
  STEP_S="$(since "$start")"
  if [ "$STEP_RC" -eq 137 ]; then STEP_RC=124; fi
}

failed() {  # failed ROW_VARIABLE [DETAIL]: the row of a step that did not pass, from STEP_RC; counts it
  local text detail="${2:-}"
  FAILURES=$((FAILURES + 1))
  detail="${detail//|/\\|}"  # a | would split the markdown cell
  case "$STEP_RC" in
    124) text="TIMEOUT after $STEP_S s${detail:+ ($detail)}" ;;
    125) text="FAILED (skipped: time budget spent)" ;;
    126) text="FAILED (not run${detail:+: $detail})" ;;
    *) text="FAILED (exit $STEP_RC after $STEP_S s${detail:+; $detail})" ;;
  esac
  printf -v "$1" '%s' "$text"
}

# --------------------------------------------------------------------------- the GPU and torch
GPU_SMI="$(nvidia-smi -L 2>/dev/null | head -n 1 | sed 's/ (UUID: [^)]*)//' || true)"
if ! TORCH_INFO="$("$PY" - <<'EOF'
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else ""
print(f"{torch.__version__}|{torch.version.cuda or 'no CUDA build'}|{int(cuda)}|{name}|{torch.cuda.device_count() if cuda else 0}")
EOF
)"; then
  echo "gpu_check: $PY cannot import torch (activate the project's environment, or set PYTHON)" >&2
  exit 1
fi
IFS='|' read -r TORCH_VERSION TORCH_CUDA CUDA_OK CUDA_NAME CUDA_COUNT <<<"$TORCH_INFO"
ROW_TORCH="$TORCH_VERSION (built for CUDA $TORCH_CUDA)"
if [ "$CUDA_OK" = "1" ]; then
  ROW_GPU="$CUDA_NAME (${CUDA_COUNT} visible${GPU_SMI:+; nvidia-smi: $GPU_SMI})"
else
  ROW_GPU="none: torch.cuda.is_available() is False${GPU_SMI:+ (nvidia-smi: $GPU_SMI)}"
fi
echo "GPU: $ROW_GPU" >&2
echo "torch: $ROW_TORCH" >&2

if [ ! -d "$CIFARVIZ_DATA" ]; then
  echo "gpu_check: no data at CIFARVIZ_DATA=$CIFARVIZ_DATA" >&2
  [ "$DRY_RUN" -eq 1 ] || exit 1
fi

# --------------------------------------------------------------------------- --dry-run: the commands parse
if [ "$DRY_RUN" -eq 1 ]; then
  for m in "${METHODS[@]}"; do
    precompute_args "$m"
    ROW_INDEX[$m]="dry run: \`python -m cifarviz ${PRE_ARGS[*]}\` parses"
  done
  "$PY" -m cifarviz train --help >/dev/null
  "$PY" -m cifarviz precompute --help >/dev/null
  "$PY" - "${TRAIN_ARGS[@]}" -- "${METHODS[@]}" <<'EOF'
import sys

from cifarviz.analysis.influence import METHODS
from cifarviz.cli import build_parser
from cifarviz.core.recipes import RECIPES

cut = sys.argv.index("--")
train_args, methods = sys.argv[1:cut], sys.argv[cut + 1:]
parser = build_parser()
args = parser.parse_args(train_args)
assert args.recipe in RECIPES, f"no shipped recipe {args.recipe!r}: {', '.join(RECIPES)}"
assert args.out.endswith(".safetensors"), args.out
for method in methods:
    assert method in METHODS, f"no influence method {method!r}: {', '.join(METHODS)}"
    parser.parse_args(["precompute", "-c", args.out, "--influence", method])
print(f"dry run: `python -m cifarviz {' '.join(train_args)}` and precompute for {', '.join(methods)} parse")
EOF
  run_step collect 120 "$PY" -m pytest -q --collect-only "${TESTS[@]}"
  if [ "$STEP_RC" -eq 0 ]; then
    ROW_TESTS="dry run: $(grep -E '[0-9]+ tests? collected' "$LOGS/collect.log" | tail -n 1) (collected, not run)"
  else
    failed ROW_TESTS "collection"
  fi
  ROW_TRAIN="dry run: \`python -m cifarviz ${TRAIN_ARGS[*]}\` parses"
  [ "$CUDA_OK" = "1" ] || ROW_GPU="$ROW_GPU (fine for --dry-run)"
  exit 0
fi

if [ "$CUDA_OK" != "1" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
  echo "gpu_check: torch.cuda.is_available() is False: this check needs a CUDA GPU (or use --dry-run)" >&2
  ROW_GPU="FAILED: $ROW_GPU"
  FAILURES=1
  exit 1
fi

# --------------------------------------------------------------------------- the tests that use CUDA
# tests/conftest.py picks CUDA through pick_device("auto"); a private, empty cache for them
run_step tests 240 env CIFARVIZ_CACHE="$WORK/test-cache" "$PY" -m pytest -q -rfE "${TESTS[@]}"
SUMMARY="$(grep -E '^[=[:space:]]*[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$LOGS/tests.log" \
  | tail -n 1 | sed -E 's/^=+ *//; s/ *=+$//' || true)"
if [ "$STEP_RC" -eq 0 ]; then
  ROW_TESTS="${SUMMARY:-passed} ($STEP_S s wall)"
else
  failed ROW_TESTS "${SUMMARY:-no pytest summary}"
fi

# --------------------------------------------------------------------------- fastnet, its shipped recipe
export CIFARVIZ_CACHE="$WORK/cache" CIFARVIZ_RUNS="$WORK/runs"
run_step train 180 "$PY" -m cifarviz "${TRAIN_ARGS[@]}"
# the CLI's last line: "saved PATH: test accuracy 0.9400 on ROOT (test split), 31 s on cuda"
SAVED="$(grep -E '^saved .*: test accuracy [0-9.]+' "$LOGS/train.log" | tail -n 1 || true)"
ACC="$(sed -E 's/.*test accuracy ([0-9.]+).*/\1/' <<<"$SAVED")"
TRAIN_S="$(sed -nE 's/.*, ([0-9.]+) s on ([^ ]+)$/\1 s on \2/p' <<<"$SAVED")"
if [ "$STEP_RC" -eq 0 ] && [ -n "$SAVED" ] && [[ "$TRAIN_S" == *" on cuda"* ]]; then
  ROW_TRAIN="$STEP_S s wall, data loading included (the CLI: training $TRAIN_S); test accuracy $ACC (flip TTA, the recipe's)"
elif [ "$STEP_RC" -eq 0 ] && [ -n "$SAVED" ]; then
  STEP_RC=1
  failed ROW_TRAIN "trained, but not on CUDA: $TRAIN_S; test accuracy $ACC"
else
  failed ROW_TRAIN "$(tail -n 1 "$LOGS/train.log" 2>/dev/null | cut -c1-200)"
fi

# --------------------------------------------------------------------------- the influence indexes
# One precompute per method, so each one's time and failure is its own. The first also computes the
# checkpoint's per-split features and its t-SNE map (cached for the others); the fit time is the one
# precompute prints for the index itself.
for m in "${METHODS[@]}"; do
  if [ ! -f "$CKPT" ]; then
    STEP_RC=126
    failed "ROW_INDEX[$m]" "no checkpoint, the training did not finish"
    continue
  fi
  precompute_args "$m"
  run_step "index-$m" 120 "$PY" -m cifarviz "${PRE_ARGS[@]}"
  BUILT="$(sed -nE "s/.* $m influence index built in ([0-9.]+) s.*/\1/p" "$LOGS/index-$m.log" | tail -n 1)"
  if [ "$STEP_RC" -eq 0 ] && [ -n "$BUILT" ]; then
    ROW_INDEX[$m]="$BUILT s fit ($STEP_S s for the whole precompute call)"
  elif [ "$STEP_RC" -eq 0 ]; then
    STEP_RC=1
    failed "ROW_INDEX[$m]" "no 'built in' line: was the index already cached?"
  else
    failed "ROW_INDEX[$m]" "$(tail -n 1 "$LOGS/index-$m.log" 2>/dev/null | cut -c1-200)"
  fi
done

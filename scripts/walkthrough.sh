#!/usr/bin/env bash
# A new user's first hour: the README top to bottom, in a fresh clone.
#
#   scripts/walkthrough.sh [REPO]          every command of the README's "Commands" section, in
#                                          order, at tiny sizes (overrides appended), then the
#                                          README's Python example
#   FULL=1 scripts/walkthrough.sh [REPO]   the commands as written, and `make demo` / `make test`
#                                          of the Quick start (hours on a CPU)
#
# REPO defaults to this repository (its committed HEAD is cloned). `make setup` installs the
# clone into its own .venv (from PyPI); MAECT_PYTHON=/path/to/python reuses an environment that
# already has maect's dependencies instead (the clone's own source is imported either way).
# Fashion-MNIST must be installed (`make data` says how). Exits non-zero at the first failure.
set -euo pipefail

REPO=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/maect-walkthrough.XXXXXX")
START=$(date +%s)
step() { printf '\n=== %s   (%ss)\n' "$*" "$(($(date +%s) - START))"; }

step "git clone $REPO"
git clone --quiet "$REPO" "$WORK/maect"
cd "$WORK/maect"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

if [[ -n "${MAECT_PYTHON:-}" ]]; then
    PY=$MAECT_PYTHON
    export PYTHONPATH="$PWD/src"
else
    step "make setup"
    make setup
    PY=$PWD/.venv/bin/python
fi
maect() { "$PY" -m maect "$@"; }
step "make data"
make data
"$PY" -c "from maect.pipeline import cpu_name; print('CPU:', cpu_name())"

if [[ -n "${FULL:-}" ]]; then
    step "make demo"
    make demo
    step "make test"
    make test
fi

# Tiny sizes for every command (appended, so they win over the README's own values).
TRAIN=(data.subset=256 data.batch_size=64 trainer.epochs=1 trainer.checkpoint_every=1)
TUNE=(maect.head_epochs=1 maect.head_warmup_epochs=0 refiner.head_epochs=1
      refiner.head_warmup_epochs=0 optim.warmup_epochs=0)
FINETUNE=(data.subset=2560 data.batch_size=8 trainer.epochs=1)  # label_fraction=0.01: 26 images
EVAL=(data.train_subset=1000 data.test_subset=500 "lowshot.seeds=[0]" linear.epochs=2
      cluster.n_init=1 plot_points=200)

mapfile -t COMMANDS < <("$PY" - <<'EOF'
import shlex
text = open("README.md").read()
block = text.split("\n## Commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
for line in block.splitlines():
    argv = shlex.split(line, comments=True)
    if argv and argv[0] == "maect":
        print(shlex.join(argv[1:]))
EOF
)
for line in "${COMMANDS[@]}"; do
    eval "args=($line)"
    missing=""
    for arg in "${args[@]}"; do  # e.g. /data/imagenet: a dataset of the reader's
        [[ "$arg" == /* && ! -e "$(dirname "$arg")" ]] && missing=$arg
    done
    if [[ -n "$missing" ]]; then
        step "skipped (needs $missing): maect ${args[*]}"
        continue
    fi
    extra=()
    if [[ -z "${FULL:-}" ]]; then
        case "${args[0]}" in
            pretrain) extra=("${TRAIN[@]}") ;;
            tune) extra=("${TRAIN[@]}" "${TUNE[@]}") ;;
            finetune) extra=("${FINETUNE[@]}") ;;
            evaluate) [[ "${args[1]}" == *.json ]] || extra=("${EVAL[@]}") ;;
            run) extra=("${TRAIN[@]}" "${TUNE[@]}" "${EVAL[@]/#/eval.}") ;;
        esac
    fi
    step "maect ${args[*]} ${extra[*]}"
    maect "${args[@]}" "${extra[@]}"
done

step "maect evaluate runs/maect/eval.json"
maect evaluate runs/maect/eval.json

step "README's Python example"
"$PY" - <<'EOF'
text = open("README.md").read()
code = text.split("## Using encoders in your code", 1)[1].split("```python\n", 1)[1]
exec(compile(code.split("```", 1)[0], "README.md", "exec"))
EOF

step "walkthrough OK in $WORK/maect"

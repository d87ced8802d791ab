#!/usr/bin/env bash
# Run transformers' tests/trainer files with self-healing attached in one mode.
#   benchmarks/hf_trainer_suite/run.sh MODE FILE [pytest args...]
# MODE: none | wrapper | attach | callbacks; FILE: e.g. test_trainer.py (under $SUITE/tests/trainer)
# Results: $SUITE/results/MODE[-PRESET]/FILE.xml (junit), .log, .events.json (plugin events per test)
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
SUITE="${SUITE:-/tmp/hf_trainer_suite}"
MODE="$1"; FILE="$2"; shift 2
OUT="results/$MODE${SELF_HEALING_PRESET:+-$SELF_HEALING_PRESET}"   # e.g. results/attach-aggressive
mkdir -p "$SUITE/$OUT"
cd "$SUITE"
SELF_HEALING_EVENTS_JSON="$SUITE/$OUT/${FILE%.py}.events.json" SELF_HEALING_ATTACH="$MODE" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
python -m pytest -p conftest_plugin -p no:xdist -p no:cacheprovider -q -rA \
  --junitxml="$OUT/${FILE%.py}.xml" "tests/trainer/$FILE" "$@" > "$OUT/${FILE%.py}.log" 2>&1
tail -3 "$OUT/${FILE%.py}.log"

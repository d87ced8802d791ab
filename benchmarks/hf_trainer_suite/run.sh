#!/usr/bin/env bash
# Run transformers' tests/trainer files with self-healing attached in one mode.
#   benchmarks/hf_trainer_suite/run.sh MODE FILE [pytest args...]
# MODE: none | wrapper | attach | callbacks; FILE: e.g. test_trainer.py (under $SUITE/tests/trainer)
# Results: $SUITE/results/MODE/FILE.xml (junit) and .log
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
SUITE="${SUITE:-/tmp/hf_trainer_suite}"
MODE="$1"; FILE="$2"; shift 2
mkdir -p "$SUITE/results/$MODE"
cd "$SUITE"
SELF_HEALING_EVENTS_JSON="$SUITE/results/$MODE/${FILE%.py}.events.json" SELF_HEALING_ATTACH="$MODE" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
python -m pytest -p conftest_plugin -p no:xdist -p no:cacheprovider -q -rA \
  --junitxml="results/$MODE/${FILE%.py}.xml" "tests/trainer/$FILE" "$@" > "results/$MODE/${FILE%.py}.log" 2>&1
tail -3 "results/$MODE/${FILE%.py}.log"

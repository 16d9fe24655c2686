#!/usr/bin/env bash
# Reruns every figure in docs/benchmarks.md, one after the other (never in
# parallel: they share the cores), and keeps the output in
# target/bench-<date>.log. Takes about 40 minutes on 2 cores (most of it the
# key service at 1 M cards: 5 minutes of preloading, then 3 rounds).
#
#   scripts/bench.sh              # everything
#   scripts/bench.sh crypto kms   # some of: crypto kms server backup
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${CARGO_BUILD_JOBS:-2}"
log="target/bench-$(date -u +%Y-%m-%dT%H%MZ).log"
mkdir -p target
which=("$@")
[ ${#which[@]} -gt 0 ] || which=(crypto kms server backup)

{
  echo "# $(date -u) on $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  for w in "${which[@]}"; do
    case "$w" in
      crypto) cargo bench -j "$jobs" -p tessera-crypto --bench crypto ;;
      kms) cargo run -j "$jobs" --release -p tessera-bench --bin kms-load ;;
      server)
        cargo run -j "$jobs" --release -p tessera-bench --bin server-load
        # One device: what one channel's sends cost without the fan-out.
        cargo run -j "$jobs" --release -p tessera-bench --bin server-load -- --devices 1 ;;
      backup) cargo run -j "$jobs" --release -p tessera-bench --bin backup-sync ;;
      *) echo "unknown benchmark: $w (one of: crypto kms server backup)" >&2; exit 2 ;;
    esac
  done
} 2>&1 | tee "$log"
echo "saved in $log"

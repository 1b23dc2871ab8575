#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), one after
# the other, growing corpus/<target> from seeds/<target>. Stops at the first
# crash; libFuzzer leaves the input in artifacts/<target>/.
# Needs cargo-fuzz: cargo install cargo-fuzz --locked
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target" "seeds/$target"
    echo "== $target (${seconds} s)"
    set +e
    cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 |
        grep -E '^(Done|stat::number_of_executed_units)|panicked|ERROR|SUMMARY'
    status="${PIPESTATUS[0]}"
    set -e
    # grep hides libFuzzer's progress lines; the status is cargo fuzz's.
    [ "$status" -eq 0 ] || { echo "$target: crash, input in artifacts/$target/"; exit 1; }
done

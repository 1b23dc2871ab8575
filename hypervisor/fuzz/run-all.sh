#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time each
# (default 60 s), one after the other, growing corpus/<target> from
# seeds/<target> and regressions/<target>. A crash leaves its input in
# artifacts/<target>/; the other targets still run, and the script fails
# at the end. Prints one summary line per target from libFuzzer's final
# statistics: executions, executions per second, coverage (edges), features,
# corpus size, and the result.
# Needs cargo-fuzz: cargo install cargo-fuzz --locked
#
#   hypervisor/fuzz/run-all.sh [seconds] [target...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build >/dev/null
logs="$(mktemp -d)"
summary=()
failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    dirs=("corpus/$target" "seeds/$target")
    [ -d "regressions/$target" ] && dirs+=("regressions/$target")
    echo "== $target (${seconds} s)"
    log="$logs/$target.log"
    set +e
    cargo fuzz run "$target" "${dirs[@]}" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    # The last status line: "#N  DONE  cov: C ft: F corp: U/S ..." (or the
    # last progress line if the run was cut short by a crash).
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$last")
    if [ "$status" -eq 0 ]; then
        result=ok
    else
        result="CRASH (artifacts/$target/)"
        failed+=("$target")
        grep -E 'panicked|ERROR|SUMMARY' "$log" | head -n 5 || true
    fi
    summary+=("$(printf '%-13s %11s runs %7s exec/s  cov %5s  ft %6s  corpus %-10s %s' \
        "$target" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")")
done
echo
echo "== summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
rm -rf "$logs"
[ "${#failed[@]}" -eq 0 ] || { echo "crashed: ${failed[*]}"; exit 1; }

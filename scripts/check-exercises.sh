#!/usr/bin/env bash
# Proves the exercises both ways: with the reference solutions every test passes, and
# on the stubs a learner starts from, every test of every exercise fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "-- with --features solutions: everything passes"
cargo test --release --locked -p kvq-exercises --features solutions

echo "-- on the stubs: every exercise's tests fail"
bad=0
for f in crates/kvq-exercises/tests/ex*.rs; do
  name=$(basename "$f" .rs)
  out=$(cargo test --release --locked -p kvq-exercises --test "$name" 2>&1 || true)
  line=$(grep -E "^test result:" <<<"$out" | tail -1)
  passed=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")
  failed=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
  if [ -z "$line" ] || [ "$passed" != 0 ] || [ "$failed" = 0 ]; then
    echo "   $name: the stub does not fail all its tests ($line)"
    bad=1
  else
    echo "   $name: $failed of $failed tests fail on the stub, as they should"
  fi
done
exit $bad

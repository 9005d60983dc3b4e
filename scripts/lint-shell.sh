#!/usr/bin/env bash
# Static check of the repo's shell scripts for one trap that made CI flaky: under
# `set -o pipefail` a consumer that stops reading early (`grep -q`, `head`, `awk '{exit}'`)
# can make the producer die of SIGPIPE when it writes again (`nft` flushes each line), and the
# pipeline then fails although the match was found (lab-test's outside_is_masqueraded failed
# this way in 2 of 300 tries). Read the whole input instead: `grep PATTERN >/dev/null`,
# `sed -n 1p`, `awk 'NR == 1 {...} END {...}'`. Prints each offending line; exit 1 if any.
set -uo pipefail
cd "$(dirname "$0")/.."
hits=$(git ls-files '*.sh' | xargs grep -nE '\|[[:space:]]*(grep[[:space:]]+(-[a-zA-Z]*[qm]|--quiet|--max-count)|head([[:space:]]|$|\))|awk[[:space:]]+'"'"'\{exit)' || true)
if [ -n "$hits" ]; then
  echo "lint-shell: a pipe into a reader that quits early (SIGPIPE under pipefail); read all input instead:" >&2
  echo "$hits" >&2
  exit 1
fi
echo "lint-shell: $(git ls-files '*.sh' | wc -l) scripts, no early-quitting pipe readers"

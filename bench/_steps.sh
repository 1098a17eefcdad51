# Sourced by the time-limited GPU scripts (gpu_checks.sh, gpu_protocol.sh): run named steps under
# their own time limits inside one overall budget, remember how each ended, print a summary table.
# A failing or skipped step never stops the next: one error must not cost the rest of a GPU run.

summary=()
budget_end=$(($(date +%s) + ${BUDGET_S:-100000}))

step() {  # step NAME SECONDS COMMAND...: run with a limit unless the budget left is smaller
  local name=$1 limit=$2 start rc
  shift 2
  if (($(date +%s) + limit > budget_end)); then
    echo "== $name skipped: its ${limit}s limit is over the $((budget_end - $(date +%s)))s of budget left"
    summary+=("$name skipped 0s")
    return
  fi
  echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  start=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  summary+=("$name rc=$rc $(($(date +%s) - start))s")
}

print_summary() {
  printf '%s\n' "== summary" "${summary[@]}"
}

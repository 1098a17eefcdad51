# Sourced by the time-limited GPU scripts (gpu_checks.sh, gpu_protocol.sh, gpu_seeds.sh): run named
# steps under their own time limits inside one overall budget, remember how each ended, print a
# summary table.
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

# Side by side (bench/gpu_seeds.sh): `job` starts a process in the background under a limit that
# ends at $deadline (its output in $logs/NAME.log); the caller keeps at most JOBS in `running`.
# `reap` waits for one to end, prints its log prefixed with its name, adds it to the summary and sets
# $ended and $ended_rc. A process that fails or is cut ends only itself.
declare -A running=() started=() # pid -> name, start time

job() {  # job NAME EXPECTED_S COMMAND...: start unless EXPECTED_S no longer fits before $deadline
  local name=$1 expected=$2 left=$((deadline - $(date +%s)))
  shift 2
  if ((expected > left)); then
    echo "== $name skipped: expected ${expected}s, ${left}s left before the deadline"
    summary+=("$name skipped 0s")
    return 1
  fi
  echo "== $name started $(date -u +%H:%M:%S) (expected ${expected}s, limit ${left}s)"
  timeout -k 10 "$left" "$@" >"$logs/$name.log" 2>&1 &
  running[$!]=$name
  started[$!]=$(date +%s)
}

reap() {
  local pid
  while :; do
    for pid in "${!running[@]}"; do
      kill -0 "$pid" 2>/dev/null && continue
      wait "$pid"
      ended_rc=$? ended=${running[$pid]}
      summary+=("$ended rc=$ended_rc $(($(date +%s) - started[$pid]))s")
      echo "== $ended ended rc=$ended_rc after $(($(date +%s) - started[$pid]))s"
      sed "s/^/[$ended] /" "$logs/$ended.log"
      unset "running[$pid]" "started[$pid]"
      return
    done
    sleep 0.2
  done
}

print_summary() {
  printf '%s\n' "== summary" "${summary[@]}"
}

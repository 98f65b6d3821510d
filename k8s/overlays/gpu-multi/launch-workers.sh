#!/usr/bin/env bash
# One `hsat worker` per GPU of this pod: LOCAL_RANK=i makes worker i use cuda:i
# (the --device default, auto). Arguments: the worker's flags without --name and
# --metrics-listen, which are set here per process (name POD_NAME-i, metrics port
# 9465+i). SIGTERM/SIGINT are forwarded to every worker (each finishes its step
# and leaves). When one worker exits non-zero the others are stopped too, so the
# Job replaces the whole pod; the launcher exits with the most severe code:
# permanent (1, 2, 78: the Job's podFailurePolicy ends the Job) over retryable
# (75, a signal's 128+n) over 0.
set -uo pipefail

n="${HSAT_LOCAL_WORKERS:?set HSAT_LOCAL_WORKERS to the number of GPUs of this pod}"
name="${POD_NAME:-$(hostname)}"

pids=()
for ((i = 0; i < n; i++)); do
  LOCAL_RANK=$i hsat "$@" --name="$name-$i" --metrics-listen="0.0.0.0:$((9465 + i))" &
  pids+=("$!")
done

stop_all() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap stop_all TERM INT

severity() {
  case "$1" in
    0) echo 0 ;;
    1 | 2 | 78) echo 2 ;;
    *) echo 1 ;;
  esac
}

worst=0
left=$n
while ((left > 0)); do
  # A trapped signal interrupts `wait -n` (status > 128, no child reaped): wait on.
  if wait -n -p done_pid "${pids[@]}"; then code=0; else code=$?; fi
  [[ -z "${done_pid:-}" ]] && continue
  left=$((left - 1))
  unset done_pid
  if (($(severity "$code") > $(severity "$worst"))); then worst=$code; fi
  if ((code != 0)); then stop_all; fi
done
exit "$worst"

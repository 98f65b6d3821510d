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
# Installed before the workers start: a SIGTERM at any time reaches all of them.
stop_all() { ((${#pids[@]} > 0)) && kill -TERM "${pids[@]}" 2>/dev/null; }
stopping=0
trap 'stopping=1; stop_all' TERM INT
for ((i = 0; i < n && !stopping; i++)); do
  LOCAL_RANK=$i hsat "$@" --name="$name-$i" --metrics-listen="0.0.0.0:$((9465 + i))" &
  pids+=("$!")
done

severity() {
  case "$1" in
    0) echo 0 ;;
    1 | 2 | 78) echo 2 ;;
    *) echo 1 ;;
  esac
}

worst=0
while ((${#pids[@]} > 0)); do
  # A trapped signal interrupts `wait -n` (status > 128, no child reaped): wait on.
  unset done_pid
  if wait -n -p done_pid "${pids[@]}"; then code=0; else code=$?; fi
  [[ -z "${done_pid:-}" ]] && continue
  running=()
  for pid in "${pids[@]}"; do
    ((pid != done_pid)) && running+=("$pid")
  done
  pids=("${running[@]}")
  if (($(severity "$code") > $(severity "$worst"))); then worst=$code; fi
  if ((code != 0 && ${#pids[@]} > 0)); then stop_all; fi
done
exit "$worst"

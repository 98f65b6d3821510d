# syntax=docker/dockerfile:1
# The coordinator image: `hsat-coordinator` (the same flags as `hsat coordinator`),
# which links no libtorch; it builds the dataset index itself (hsat-core) and
# never decodes images. Build from the repository root:
#   docker build -f k8s/images/coordinator.Dockerfile -t REGISTRY/hsat/coordinator:0.1.0 .
# Base images are pinned by exact tag; pin them by digest for reproducible builds:
#   docker buildx imagetools inspect rust:1.95.0-bookworm (and debian:12.11-slim),
#   then write FROM rust:1.95.0-bookworm@sha256:<digest>. No digest is written here:
#   none could be checked from this machine (no registry access).

FROM rust:1.95.0-bookworm AS build
ENV CARGO_TARGET_DIR=/src/target
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p hsat-coordinator --bin hsat-coordinator \
    && install -D -m 0755 target/release/hsat-coordinator /out/usr/local/bin/hsat-coordinator

FROM debian:12.11-slim
COPY --from=build /out/ /
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
# Kubernetes probes the coordinator over grpc.health.v1 (k8s/base/coordinator.yaml);
# a Docker HEALTHCHECK would not be used.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/hsat-coordinator"]

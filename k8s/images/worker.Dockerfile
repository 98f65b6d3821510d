# The worker image: hsat with libtorch from the torch==2.13.0 wheel (scripts/setup.sh).
# Build from the repository root: docker build -f k8s/images/worker.Dockerfile .
# For GPUs add `--build-arg FEATURES=nccl`.
FROM rust:1.95-bookworm AS build
ARG FEATURES=""
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh && cargo build --release -p hsat --features "$FEATURES" \
    && cp "$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/hsat" /usr/local/bin/hsat

FROM python:3.11-slim-bookworm
# The binary finds libtorch through its run path, inside the venv setup.sh made.
COPY --from=build /root/.cache/hsat /root/.cache/hsat
COPY --from=build /usr/local/bin/hsat /usr/local/bin/hsat
ENTRYPOINT ["/usr/local/bin/hsat"]

# The coordinator image: no libtorch (hsat-coordinator does not link it).
# Build from the repository root: docker build -f k8s/images/coordinator.Dockerfile .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p hsat-coordinator --bin hsat-coordinator

FROM debian:bookworm-slim
COPY --from=build /src/target/release/hsat-coordinator /usr/local/bin/hsat-coordinator
ENTRYPOINT ["/usr/local/bin/hsat-coordinator"]

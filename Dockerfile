# A small image with cairn on PATH: `docker build -t cairn:0.1 .`
#
# Build stage: the release binary from this checkout, with the locked dependencies.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/cairn

# Run stage: Debian slim with CA certificates (S3, Azure over TLS) and the OpenSSH
# client (nodes reached with exec = ["ssh", …]). For nodes reached with
# `kubectl exec`, add kubectl to this stage.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/cairn --uid 10001 cairn
COPY --from=build /src/target/release/cairn /usr/local/bin/cairn
USER cairn
# The run state (resume, history) lives here: mount a volume to keep it.
ENV CAIRN_HOME=/var/lib/cairn/state
ENTRYPOINT ["cairn"]
CMD ["--help"]

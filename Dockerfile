# syntax=docker/dockerfile:1
# switchyard: multi-stage build. Dependencies are compiled in their own layer (cached until
# Cargo.toml/Cargo.lock change); librdkafka is vendored and built with gcc/make.

FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc g++ pkg-config perl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependency layer: a stub crate with the real manifests.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
# The application itself.
COPY src ./src
COPY config ./config
COPY schemas ./schemas
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip target/release/switchyard

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid switchyard --no-create-home --shell /usr/sbin/nologin switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY --from=build /src/config /etc/switchyard/examples
COPY --from=build /src/schemas /usr/share/switchyard/schemas
USER 10001:10001
# /metrics, /healthz, /readyz
EXPOSE 9464
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.yaml
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run"]

# amb-serf: a static binary on an empty image (no shell, no libc, no package manager).
#
#   docker build -t amb-serf .
#   docker run -d --link mysql:mysql --link serf_1:serf_1 -p 3306:3306 amb-serf
#
# Works with the classic builder and BuildKit; no `# syntax` line, so nothing is pulled but
# the build stage's base. RUST_IMAGE picks that base: any Debian-like image with cargo, rustc
# and gcc/libc6-dev on PATH (the tests pass a locally built one; see scripts/docker-test-images).
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
# The cargo profile: `release` (fat LTO) for users; the tests pass `docker-test` (Cargo.toml).
ARG CARGO_PROFILE=release
# Marks this stage's (dangling) cache images, so they can be pruned by label.
LABEL amb-serf.stage=build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    RUSTFLAGS="-C target-feature=+crt-static"

# 1. Dependencies only, cached as a layer while the manifests and Cargo.lock do not change.
#    Every workspace member's manifest is listed here: add a line when adding a crate.
COPY Cargo.toml Cargo.lock ./
COPY crates/proxy/Cargo.toml crates/proxy/
COPY crates/serf/Cargo.toml crates/serf/
COPY crates/serf-agent/Cargo.toml crates/serf-agent/
COPY crates/registrar/Cargo.toml crates/registrar/
COPY crates/dns/Cargo.toml crates/dns/
COPY crates/testkit/Cargo.toml crates/testkit/
COPY crates/bench/Cargo.toml crates/bench/
# Stub sources so cargo can load the workspace: each crate's lib.rs, the binary, and every
# target file a manifest names with `path = "…"` (e.g. tests/e2e/main.rs).
RUN set -eu; \
    for lib in crates/*/Cargo.toml; do mkdir -p "${lib%Cargo.toml}src"; : > "${lib%Cargo.toml}src/lib.rs"; done; \
    for file in src/main.rs $(sed -n 's/^path *= *"\(.*\.rs\)".*/\1/p' Cargo.toml crates/*/Cargo.toml); do \
      mkdir -p "$(dirname "$file")"; [ -e "$file" ] || echo 'fn main() {}' > "$file"; \
    done; \
    # The host triple, built explicitly so RUSTFLAGS (crt-static) skip build scripts and proc macros.
    rustc -vV | sed -n 's/^host: //p' > /target-triple; \
    cargo build --profile "$CARGO_PROFILE" --locked --target "$(cat /target-triple)" --bin amb-serf

# 2. The real sources. Touch them: the stubs above are newer than the files COPY brings in.
COPY . .
RUN set -eu; \
    find src crates -name '*.rs' -exec touch {} +; \
    triple="$(cat /target-triple)"; \
    cargo build --profile "$CARGO_PROFILE" --locked --target "$triple" --bin amb-serf; \
    bin="target/$triple/$CARGO_PROFILE/amb-serf"; \
    if readelf -l "$bin" | grep -q 'program interpreter'; then echo "error: $bin is not static" >&2; exit 1; fi; \
    "$bin" --version; \
    mkdir -p /out/usr/local/bin /out/etc; \
    cp "$bin" /out/usr/local/bin/amb-serf; \
    # Invoked as `serf`, the binary is the `serf` command line (`docker exec c serf members`).
    ln -s amb-serf /out/usr/local/bin/serf; \
    # Only the dependency layer above is worth caching: keep this one small.
    rm -rf target; \
    echo 'amb-serf:x:10001:10001:amb-serf:/:/nonexistent' > /out/etc/passwd; \
    echo 'amb-serf:x:10001:' > /out/etc/group; \
    # Static glibc (>= 2.34) has the files and dns NSS modules built in; say which to use, as
    # Docker writes /etc/hosts (--link) and /etc/resolv.conf (its embedded DNS) but no nsswitch.conf.
    echo 'hosts: files dns' > /out/etc/nsswitch.conf

FROM scratch
COPY --from=build /out/ /
USER 10001:10001
# AMB_METRICS_ADDR: /livez, /readyz, /healthz and /metrics (`run`, `connect` and `agent`) for the
# HEALTHCHECK below; `amb-serf health` checks it on loopback. AMB_DRAIN_TIMEOUT: drain within
# Docker's default 10 s stop grace. Exposed: gossip and metrics; RPC (7373) listens on loopback.
ENV PATH=/usr/local/bin \
    AMB_METRICS_ADDR=0.0.0.0:9090 \
    AMB_DRAIN_TIMEOUT=8s
EXPOSE 7946/tcp 7946/udp 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 CMD ["amb-serf", "health"]
LABEL org.opencontainers.image.title="amb-serf" \
      org.opencontainers.image.description="Docker ambassador: forwards linked ports and advertises them in a Serf cluster"
ENTRYPOINT ["amb-serf"]
CMD ["run"]

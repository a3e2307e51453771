# The `hangar` container image: one static binary, run as the non-root user 65532, with `hangar` as
# the entrypoint (`docker run IMAGE controller|drone|proxy|dns …`; without arguments `hangar dev`).
#
# From source (BuildKit or Docker's legacy builder, `DOCKER_BUILDKIT=0`; pulls the two base images):
#
#   docker build -t hangar .
#
# From a binary built on this machine, pulling nothing (this is what the test suite builds):
# `scripts/build-image.sh` builds a static binary and the `prebuilt` target from a small context
# holding it at packaging/docker/rootfs/usr/local/bin/hangar.
#
# Why the `prebuilt` stage comes first and copies whole directories: the legacy builder builds every
# stage before its `--target` (all of them without one) in the same context, where BuildKit skips
# unused stages. First, it needs no Rust image on the prebuilt path; copying directories that the
# repository holds too (without the binary), it also succeeds, unused, in `docker build .`.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

# ---- prebuilt: a static binary from the build context (see scripts/build-image.sh) -------------
FROM scratch AS prebuilt
# /etc/passwd and /etc/group (root and nonroot, as distroless has them), and /usr/local/bin/hangar.
COPY packaging/docker/rootfs/ /
# The data directory of `hangar dev` and the drone's state file, writable by the user.
COPY --chown=65532:65532 packaging/docker/data/ /var/lib/hangar/
ENV HANGAR_DATA_DIR=/var/lib/hangar
USER 65532:65532
WORKDIR /var/lib/hangar
LABEL org.opencontainers.image.title="hangar" \
      org.opencontainers.image.licenses="MIT"
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/hangar"]
CMD ["dev", "--host", "0.0.0.0"]

# ---- build: the static binary, from the repository --------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# glibc linked statically (as scripts/build-image.sh does on the host), so the runtime image needs
# no libc; the release profile (Cargo.toml) strips and thin-LTOs it.
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked -p hangar --target "$target" \
 && install -D "target/$target/release/hangar" /out/usr/local/bin/hangar \
 && mkdir -p /out-data

# ---- runtime (the default target): distroless, non-root -----------------------------------------
# Its settings repeat the prebuilt stage's on purpose, and must stay the same: one stage cannot serve
# both, since the legacy builder would then build (and pull) the Rust stage for the prebuilt path.
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /out/ /
COPY --from=build --chown=65532:65532 /out-data/ /var/lib/hangar/
ENV HANGAR_DATA_DIR=/var/lib/hangar
USER 65532:65532
WORKDIR /var/lib/hangar
LABEL org.opencontainers.image.title="hangar" \
      org.opencontainers.image.licenses="MIT"
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/hangar"]
CMD ["dev", "--host", "0.0.0.0"]

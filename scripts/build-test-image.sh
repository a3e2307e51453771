#!/usr/bin/env bash
# Builds the Docker image `hangar-test-backend:latest` that the Docker executor tests run: the test
# backend linked statically, in a `FROM scratch` image (no registry is needed, nothing is pulled).
# Idempotent: cargo rebuilds only what changed, and Docker reuses its layer cache.
#
#   scripts/build-test-image.sh            # build (or refresh) the image
#   IMAGE=name:tag scripts/build-test-image.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE="${IMAGE:-hangar-test-backend:latest}"
TARGET=x86_64-unknown-linux-gnu
TARGET_DIR=target/static

RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build -p hangar-test-backend --release --target "$TARGET" --target-dir "$TARGET_DIR"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$TARGET_DIR/$TARGET/release/hangar-test-backend" "$context/hangar-test-backend"
cat > "$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY hangar-test-backend /hangar-test-backend
LABEL dev.hangar.test=1
EXPOSE 8080
ENTRYPOINT ["/hangar-test-backend"]
DOCKERFILE

docker build --quiet --tag "$IMAGE" "$context" >/dev/null
echo "Built $IMAGE ($(docker image inspect --format '{{.Id}}' "$IMAGE"))"

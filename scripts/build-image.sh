#!/usr/bin/env bash
# Builds the `hangar` container image from a binary built on this machine, pulling nothing: a static
# binary (glibc linked statically, as scripts/build-test-image.sh does for the test backend), then the
# Dockerfile's `prebuilt` target from a small context holding it (works with Docker's legacy builder).
# Idempotent: cargo rebuilds only what changed, Docker reuses its layer cache.
#
#   scripts/build-image.sh                          # hangar:latest, release profile
#   IMAGE=hangar:dev PROFILE=dev scripts/build-image.sh
#   LABEL=dev.hangar.test-run=t123 scripts/build-image.sh   # an extra label on the image
#   PROFILE=dev scripts/build-image.sh --binary-only        # only the static binary (CI, before the tests)
#
# The binary lands in target/static/<host triple>/<release|debug>/hangar (target/static: the static
# builds' own directory, shared with scripts/build-test-image.sh). The last line printed is the
# image's name.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE="${IMAGE:-hangar:latest}"
PROFILE="${PROFILE:-release}"
TARGET="$(rustc -vV | sed -n 's/^host: //p')"
case "$PROFILE" in
  dev) dir=debug ;;
  *) dir="$PROFILE" ;;
esac

TARGET_DIR=target/static
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build -p hangar --profile "$PROFILE" --target "$TARGET" --target-dir "$TARGET_DIR" >&2

if [ "${1:-}" = --binary-only ]; then
  echo "$TARGET_DIR/$TARGET/$dir/hangar"
  exit 0
fi

# The context holds what the `prebuilt` stage copies, at the repository's paths, plus the binary.
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/packaging"
cp -r packaging/docker "$context/packaging/"
rm "$context/packaging/docker/data/.keep"   # as .dockerignore does for `docker build .`
install -D -m 0755 "$TARGET_DIR/$TARGET/$dir/hangar" "$context/packaging/docker/rootfs/usr/local/bin/hangar"

label_args=()
if [ -n "${LABEL:-}" ]; then
  label_args=(--label "$LABEL")
fi
docker build --quiet --file Dockerfile --target prebuilt "${label_args[@]}" --tag "$IMAGE" "$context" >&2
echo "$IMAGE"

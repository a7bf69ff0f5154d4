#!/usr/bin/env bash
# Builds the pgs2 image (tag $1, default pgs2:dev) from static binaries
# built here, on a scratch base (deploy/Dockerfile.prebuilt): no base image
# is pulled, so it builds where registries cannot be reached. The compose
# file's image is built from the sources by deploy/Dockerfile instead.
set -euo pipefail
tag=${1:-pgs2:dev}
cd "$(dirname "$0")/.."
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/data"
for s in capture router delivery s2local pgs2ctl; do
	CGO_ENABLED=0 go build -trimpath -o "$ctx/bin/$s" "./services/$s"
done
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
	cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
else
	echo "build-image: no /etc/ssl/certs/ca-certificates.crt here: the image trusts no CA (TLS to S2 fails)" >&2
	: >"$ctx/ca-certificates.crt"
fi
cp deploy/Dockerfile.prebuilt "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
echo "$tag"

#!/usr/bin/env bash
# Regenerates the Go code of every proto/**/*.proto next to its .proto file
# (messages only: no gRPC service code). Called by `make proto`.
#
# protoc-gen-go is pinned to the google.golang.org/protobuf version in go.mod
# and installed into .bin/ on first use. The committed code was generated with
# protoc 3.21.12 (Debian/Ubuntu protobuf-compiler); another protoc version
# changes only the version line in the generated headers.
set -euo pipefail

PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_VERSION=3.21.12

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bin="$root/.bin"
plugin="$bin/protoc-gen-go"

if ! command -v protoc >/dev/null 2>&1; then
	echo "gen-proto: protoc not found; install protobuf-compiler: apt-get install protobuf-compiler" >&2
	exit 1
fi
have_protoc="$(protoc --version | awk '{print $2}')"
if [[ "$have_protoc" != "$PROTOC_VERSION" ]]; then
	echo "gen-proto: warning: protoc $have_protoc, the committed code used $PROTOC_VERSION (only the header's version line differs)" >&2
fi

if [[ ! -x "$plugin" ]] || [[ "$("$plugin" --version 2>/dev/null)" != "protoc-gen-go $PROTOC_GEN_GO_VERSION" ]]; then
	echo "gen-proto: installing protoc-gen-go $PROTOC_GEN_GO_VERSION into .bin/" >&2
	GOBIN="$bin" go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
fi

mapfile -t protos < <(find proto -name '*.proto' -type f | LC_ALL=C sort)
if [[ ${#protos[@]} -eq 0 ]]; then
	echo "gen-proto: no .proto files under proto/" >&2
	exit 0
fi

protoc \
	--plugin=protoc-gen-go="$plugin" \
	--proto_path=proto \
	--go_out=proto \
	--go_opt=paths=source_relative \
	"${protos[@]}"

echo "gen-proto: generated Go code for ${#protos[@]} file(s)" >&2

#!/usr/bin/env bash
# Builds the test servers that no package registry here ships as binaries, from their Go
# modules at pinned releases, into $TFSCACHE_CACHE/bin (outside the repo), once:
#   consul  (service discovery tests)         github.com/hashicorp/consul
#   minio   (S3-compatible store for tests)   github.com/minio/minio
#   fake-gcs-server (GCS emulator for tests)  github.com/fsouza/fake-gcs-server
# `go install mod@version` refuses modules whose go.mod has replace directives (Consul points
# at its own submodules), so each is built from a throwaway wrapper module that requires it.
set -euo pipefail
CACHE="${TFSCACHE_CACHE:-$HOME/.cache/tfscache}"
BIN="$CACHE/bin"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
# The checksum database does not answer for every submodule version the proxy serves: the
# proxy's content is what we build from (test servers only, never shipped).
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 GOSUMDB=off
mkdir -p "$BIN"
# one build at a time per cache (several checkouts may share one): the others wait, then find
# what they need already built
exec 9>"$BIN/.build.lock"
flock 9

CONSUL_VERSION=v1.22.0
CONSUL_SUBMODULES="api@v1.33.0 sdk@v0.17.0 proto-public@v0.7.0 envoyextensions@v0.9.0 troubleshoot@v0.8.0"
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c   # the last commit the module proxy serves
FAKE_GCS_VERSION=v1.56.1

command -v go >/dev/null || { echo "build_go_servers: Go is required" >&2; exit 1; }

# build NAME MODULE VERSION PACKAGE [extra go.mod lines...]
build() {
  local name=$1 module=$2 version=$3 package=$4; shift 4
  local stamp="$BIN/.$name.version"
  if [ -x "$BIN/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    return 0
  fi
  local dir="$CACHE/go/wrappers/$name"
  rm -rf "$dir" && mkdir -p "$dir"
  {
    echo "module tfscache.test/$name-wrapper"
    echo "go 1.24"
    echo "require $module $version"
    for line in "$@"; do echo "$line"; done
  } > "$dir/go.mod"
  printf 'package main\n\nimport _ "%s"\n' "$package" > "$dir/tools.go"
  echo "build_go_servers: building $name $version (once; cached in $BIN)"
  local started=$SECONDS
  (cd "$dir" && go mod tidy >/dev/null 2>&1 || true
   cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/$name.tmp" "$package")
  mv "$BIN/$name.tmp" "$BIN/$name"
  echo "$version" > "$stamp"
  echo "build_go_servers: $name built in $((SECONDS - started))s"
}

consul_requires=()
for sub in $CONSUL_SUBMODULES; do
  consul_requires+=("require github.com/hashicorp/consul/${sub%@*} ${sub#*@}")
done
build consul github.com/hashicorp/consul "$CONSUL_VERSION" github.com/hashicorp/consul \
  "${consul_requires[@]}" \
  "exclude github.com/hashicorp/go-msgpack v1.1.5" \
  "exclude github.com/hashicorp/go-msgpack v1.1.6"

if ! build minio github.com/minio/minio "$MINIO_VERSION" github.com/minio/minio; then
  # the S3 tests fall back to moto's server mode (tests/harness/servers.py says which ran)
  echo "build_go_servers: MinIO did not build; S3 tests will use moto_server" >&2
fi

if ! build fake-gcs-server github.com/fsouza/fake-gcs-server "$FAKE_GCS_VERSION" github.com/fsouza/fake-gcs-server; then
  # the GCS tests skip, saying why (tests/harness/servers.py)
  echo "build_go_servers: fake-gcs-server did not build; GCS tests will be skipped" >&2
fi

#!/usr/bin/env bash
# Builds the data-plane benchmark's Go programs into $TFSCACHE_CACHE/bin (outside the repo),
# once per version of their sources (a hash of them is the stamp):
#   fastbackend, grpcload   bench/fastbackend (ours): a TF Serving stand-in and a gRPC load generator
#   tfservingcache          the original TFServingCache (Go), for side-by-side figures, built from
#                           a copy of $TFSCACHE_PEER_TFSERVINGCACHE (default
#                           /work/shared/peers/TFServingCache) under $TFSCACHE_CACHE/peers;
#                           none of its code is in this repository. No source there: skipped,
#                           and bench.data_plane says the original was not measured.
# Exit status: non-zero only if our own programs did not build.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${TFSCACHE_CACHE:-$HOME/.cache/tfscache}"
BIN="$CACHE/bin"
PEER_SRC="${TFSCACHE_PEER_TFSERVINGCACHE:-/work/shared/peers/TFServingCache}"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 GOSUMDB=off
mkdir -p "$BIN"

command -v go >/dev/null || { echo "build_go_bench: Go is required" >&2; exit 1; }

# sources_hash DIR: one hash of the Go sources and module files under DIR
sources_hash() {
  (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | sort -z \
     | xargs -0 sha1sum | sha1sum | cut -c1-16)
}

fresh() {  # fresh NAME HASH: the binary is there and built from these sources
  [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ]
}

status=0
ours=$(sources_hash bench/fastbackend)
if fresh fastbackend "$ours" && fresh grpcload "$ours"; then
  :
else
  echo "build_go_bench: building fastbackend, grpcload ($ours; cached in $BIN)"
  started=$SECONDS
  if (cd bench/fastbackend && go build -trimpath -ldflags "-s -w" -o "$BIN/fastbackend.tmp" ./cmd/fastbackend \
        && go build -trimpath -ldflags "-s -w" -o "$BIN/grpcload.tmp" ./cmd/grpcload); then
    for name in fastbackend grpcload; do
      mv "$BIN/$name.tmp" "$BIN/$name" && echo "$ours" > "$BIN/.$name.version"
    done
    echo "build_go_bench: built in $((SECONDS - started))s"
  else
    echo "build_go_bench: fastbackend/grpcload did not build" >&2
    status=1
  fi
fi

if [ ! -f "$PEER_SRC/go.mod" ]; then
  echo "build_go_bench: no TFServingCache source at $PEER_SRC: the original is not built" \
       "(bench.data_plane measures without it)" >&2
  exit $status
fi
peer=$(sources_hash "$PEER_SRC")
if ! fresh tfservingcache "$peer"; then
  echo "build_go_bench: building the original TFServingCache ($peer; a few minutes, once; cached in $BIN)"
  started=$SECONDS
  dir="$CACHE/peers/TFServingCache"
  rm -rf "$dir" && mkdir -p "$(dirname "$dir")" && cp -r "$PEER_SRC" "$dir"
  if (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/tfservingcache.tmp" ./cmd/taskhandler); then
    mv "$BIN/tfservingcache.tmp" "$BIN/tfservingcache" && echo "$peer" > "$BIN/.tfservingcache.version"
    echo "build_go_bench: TFServingCache built in $((SECONDS - started))s"
  else
    echo "build_go_bench: TFServingCache did not build (bench.data_plane measures without it)" >&2
  fi
fi
exit $status

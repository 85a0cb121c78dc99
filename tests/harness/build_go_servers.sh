#!/usr/bin/env bash
# Builds the test servers that no package registry here ships as binaries, from their Go
# modules at pinned releases, into $TFSCACHE_CACHE/bin (outside the repo), once:
#   consul  (service discovery tests)         github.com/hashicorp/consul
#   minio   (S3-compatible store for tests)   github.com/minio/minio
#   fake-gcs-server (GCS emulator for tests)  github.com/fsouza/fake-gcs-server
#   etcd    (kube-apiserver's store; Debian's 3.4 lacks the streaming-list watch)  go.etcd.io/etcd
#   kube-apiserver (Kubernetes discovery tests) k8s.io/kubernetes
#   helm    (chart lint/template tests)       helm.sh/helm
# With names as arguments, builds only those (e.g. `build_go_servers.sh kube-apiserver`).
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
ETCD_VERSION=v3.6.8
KUBERNETES_VERSION=v1.36.3   # its staging modules (k8s.io/api, ...) are tagged v0.36.3
HELM_VERSION=v4.2.4   # the last helm on the Kubernetes libraries of KUBERNETES_VERSION (client-go v0.36)
ONLY=" $* "

command -v go >/dev/null || { echo "build_go_servers: Go is required" >&2; exit 1; }

# build NAME MODULE VERSION PACKAGE [extra go.mod lines...]; $BUILD_LDFLAGS adds -ldflags (-X ...)
build() {
  local name=$1 module=$2 version=$3 package=$4; shift 4
  local stamp="$BIN/.$name.version"
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then
    return 0
  fi
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
  # explicit returns: callers test the status with `if !`, which turns off `set -e` in here
  (cd "$dir" && go mod tidy >/dev/null 2>&1 || true
   cd "$dir" && go build -trimpath -ldflags "-s -w ${BUILD_LDFLAGS:-}" -o "$BIN/$name.tmp" "$package") \
    || return 1
  mv "$BIN/$name.tmp" "$BIN/$name" || return 1
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

# etcd's server module replaces its sibling modules with ../ paths: require them at the release.
etcd_requires=()
for sub in api/v3 client/pkg/v3 client/v3 pkg/v3; do
  etcd_requires+=("require go.etcd.io/etcd/$sub $ETCD_VERSION")
done
if ! build etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 \
    "${etcd_requires[@]}"; then
  echo "build_go_servers: etcd did not build; the Kubernetes tests will skip" >&2
fi

# k8s.io/kubernetes replaces its staging modules with ./staging paths: require each at the
# matching v0 tag (sample-cli-plugin is not served by the proxy and not needed). Without the
# -X flags a plain build reports v0.0.0-master, which kubectl's version skew check dislikes.
kube_minor=${KUBERNETES_VERSION#v1.}; kube_minor=${kube_minor%%.*}
kube_staging_version="v0.${KUBERNETES_VERSION#v1.}"
kube_requires=()
for sub in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider \
    cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api \
    cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice \
    externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl \
    kubelet metrics mount-utils pod-security-admission sample-apiserver sample-controller \
    streaming; do
  kube_requires+=("require k8s.io/$sub $kube_staging_version")
done
kube_version_pkg=k8s.io/component-base/version
if ! BUILD_LDFLAGS="-X $kube_version_pkg.gitVersion=$KUBERNETES_VERSION \
    -X $kube_version_pkg.gitMajor=1 -X $kube_version_pkg.gitMinor=$kube_minor \
    -X $kube_version_pkg.gitTreeState=clean" \
    build kube-apiserver k8s.io/kubernetes "$KUBERNETES_VERSION" \
    k8s.io/kubernetes/cmd/kube-apiserver "${kube_requires[@]}"; then
  echo "build_go_servers: kube-apiserver did not build; the Kubernetes tests will skip" >&2
fi

# helm on the very same k8s.io module versions as kube-apiserver: the build cache holds their
# compiled packages already (helm's own code and its other dependencies still take minutes)
helm_major=${HELM_VERSION%%.*}
if ! BUILD_LDFLAGS="-X helm.sh/helm/$helm_major/internal/version.version=$HELM_VERSION" \
    build helm "helm.sh/helm/$helm_major" "$HELM_VERSION" "helm.sh/helm/$helm_major/cmd/helm" \
    "${kube_requires[@]}"; then
  echo "build_go_servers: helm did not build; the chart tests will skip" >&2
fi

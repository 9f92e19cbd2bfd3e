#!/usr/bin/env bash
# `make gpu-bundle`: one folder that runs our compiled models on a GPU machine that has a driver,
# Python and numpy but no package index and no room for the TVM compiler (64 MiB travel there).
#   site/      a runtime-only TVM for the device's Python: the apache-tvm and apache-tvm-ffi
#              wheels (same versions as .venv/) unzipped, minus libtvm_compiler.so (260 MB),
#              the C++ headers and sources and the bundled 3rdparty trees
#   lib/       libcudart.so.13 from this machine's CUDA (libtvm_runtime_cuda.so links it)
#   models/    the compiled libraries, weights lifted out (benchmarks/bench_gpu.py build)
#   kernels/   their CUDA modules compiled by nvcc here, one fatbin per module source
#   data.npz   what cannot be regenerated from the seed (structure of pruned layers, kept-node
#              indices, reference outputs); manifest.json says how to make the rest
#   gpu_run.py the runner (tvm_scalpel/gpu_runner.py), src/ our package's source
# Usage: scripts/gpu_bundle.sh [--python 3.12] [--device cuda|cpu] [--out DIR] [--limit-mib N]
#                              [-- ARGS for bench_gpu.py build, e.g. --models lenet5]
# The wheels are cached in .gpu_bundle/wheels/; the bundle is built in a scratch folder and
# renamed into place, so a failed run leaves no half-built bundle. Exit 1 (and no bundle) if it
# is over the size limit.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=3.12
DEVICE=cuda
OUT=.gpu_bundle/bundle
LIMIT_MIB=60  # 64 MiB travel to the device, the repository's own files included
PY="${PYTHON_VENV:-.venv/bin/python}"
BUILD_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --limit-mib) LIMIT_MIB="$2"; shift 2 ;;
        --) shift; BUILD_ARGS=("$@"); break ;;
        *) echo "gpu-bundle: error: unknown argument $1" >&2; exit 2 ;;
    esac
done
say() { echo "gpu-bundle: $*"; }
die() { echo "gpu-bundle: error: $*" >&2; exit "${2:-1}"; }

[ -x "$PY" ] || die "$PY not found: run \`make setup\` first" 2
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python takes a version like 3.12, not $PYVER" 2
[ "$DEVICE" = cuda ] || [ "$DEVICE" = cpu ] || die "--device is cuda or cpu, not $DEVICE" 2
TAG="cp${PYVER/./}"
CACHE="${TVM_SCALPEL_WHEEL_CACHE:-.gpu_bundle/wheels}/$TAG"

# ------------------------------------------------------------- 1. wheels (cached), same pins
read -r -a PINS <<<"$("$PY" -c '
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("apache-tvm", "apache-tvm-ffi")))')"
have_wheels() {
    for pin in "${PINS[@]}"; do
        local name="${pin%%==*}" version="${pin##*==}"
        ls "$CACHE"/"${name//-/_}"-"$version"-*.whl >/dev/null 2>&1 || return 1
    done
}
if have_wheels; then
    say "wheels for $TAG in $CACHE (${PINS[*]})"
else
    say "downloading ${PINS[*]} for $TAG"
    mkdir -p "$CACHE"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CACHE" "${PINS[@]}" \
        || die "pip download of ${PINS[*]} for Python $PYVER failed" 3
    have_wheels || die "no $TAG wheels of ${PINS[*]} in $CACHE after pip download" 3
fi

# ------------------------------------------------------------- 2. runtime-only TVM in site/
mkdir -p "$(dirname "$OUT")"
WORK="$(mktemp -d "$(dirname "$OUT")/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
for pin in "${PINS[@]}"; do
    name="${pin%%==*}" version="${pin##*==}"
    "$PY" -m zipfile -e "$(ls "$CACHE"/"${name//-/_}"-"$version"-*.whl | head -1)" "$WORK/site"
done
rm -f "$WORK/site/tvm/lib/libtvm_compiler.so"
rm -rf "$WORK"/site/tvm/{3rdparty,src,include,web} "$WORK"/site/tvm_ffi/{3rdparty,include,src,cython}
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
[ -f "$WORK/site/tvm/lib/libtvm_runtime.so" ] || die "no libtvm_runtime.so in the apache-tvm wheel"
[ "$DEVICE" = cpu ] || [ -f "$WORK/site/tvm/lib/libtvm_runtime_cuda.so" ] \
    || die "no libtvm_runtime_cuda.so in the apache-tvm wheel"
say "runtime-only TVM: $(du -sh "$WORK/site" | cut -f1)"

# ------------------------------------------------------------- 3. libcudart for the CUDA runtime
if [ "$DEVICE" = cuda ]; then
    command -v nvcc >/dev/null || die "nvcc not found: the CUDA kernels are compiled here" 2
    cudart=""
    for home in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" \
                /usr/local/cuda /usr/local/cuda-*; do
        [ -n "$home" ] || continue
        cudart="$(ls "$home"/lib64/libcudart.so.[0-9]* "$home"/lib/libcudart.so.[0-9]* \
                  "$home"/targets/x86_64-linux/lib/libcudart.so.[0-9]* 2>/dev/null | head -1 || true)"
        [ -z "$cudart" ] || break
    done
    [ -n "$cudart" ] || die "libcudart.so.* not found (set CUDA_HOME)"
    mkdir -p "$WORK/lib"
    cp -L "$cudart" "$WORK/lib/$(basename "$cudart" | sed -E 's/^(libcudart\.so\.[0-9]+).*/\1/')"
fi

# ------------------------------------------------------------- 4. models, runner, our source
"$PY" benchmarks/bench_gpu.py build --out "$WORK" --device "$DEVICE" "${BUILD_ARGS[@]}"
cp tvm_scalpel/gpu_runner.py "$WORK/gpu_run.py"
mkdir -p "$WORK/src"
tar cf - --exclude=__pycache__ tvm_scalpel passes schedules | tar xf - -C "$WORK/src"

# ------------------------------------------------------------- 5. size check, then into place
bytes="$(du -sb "$WORK" | cut -f1)"
mib="$(( (bytes + 1048575) / 1048576 ))"
if [ "$bytes" -gt "$(( LIMIT_MIB * 1048576 ))" ]; then
    du -sh "$WORK"/* >&2
    die "the bundle is $mib MiB, over the $LIMIT_MIB MiB limit (64 MiB travel to the device)"
fi
rm -rf "$OUT"
mv "$WORK" "$OUT"
trap - EXIT
say "ready: $OUT ($mib MiB of $LIMIT_MIB; $(ls "$OUT"/models | wc -l) libraries)"
say "run it: python3 $OUT/gpu_run.py [--out results.json]   (then: benchmarks/bench_gpu.py report results.json)"

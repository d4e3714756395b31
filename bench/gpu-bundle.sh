#!/usr/bin/env bash
# gpu-bundle.sh - builds, on this machine, what bench/gpu-check.sh runs on a
# GPU machine, so that the device's short time goes to running, not building:
#
#   build-gpu/bundle/bin/     hexflow, test_cuda, gpu_bench (Release, CUDA for
#                             sm_80/89/90)
#   build-gpu/bundle/libs.tar.xz
#                             the shared libraries they need that a bare GPU
#                             image may lack (libfyaml, jansson, GLPK, METIS,
#                             LAPACKE/OpenBLAS, hwloc, libssh2, libmicrohttpd,
#                             cmocka ...), compressed; not glibc, libstdc++ or
#                             the CUDA toolkit's own libraries (the device has
#                             those)
#
# Then: run(command="bash bench/gpu-check.sh $OUT", carry=["build-gpu/bundle"]).
# The GPU machine runs the same Debian image, so the binaries load there.
set -eu -o pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
B=$SRC/build-gpu
OUTB=$B/bundle
mkdir -p "$B"
cmake -S "$SRC" -B "$B" -DCMAKE_BUILD_TYPE=Release -DHX_WITH_CUDA=ON >"$B/configure.txt"
grep -q "CUDA backend: ON" "$B/configure.txt" ||
    { echo "gpu-bundle: no CUDA toolkit found: nothing to bundle" >&2; exit 1; }
cmake --build "$B" -j "$(nproc 2>/dev/null || echo 2)" --target hexflow test_cuda gpu_bench
rm -rf "$OUTB"
mkdir -p "$OUTB/bin" "$OUTB/lib"
cp "$B/hexflow" "$B/test_cuda" "$B/gpu_bench" "$OUTB/bin/"
# every library they load, but the C runtime and the CUDA toolkit's
for bin in "$OUTB"/bin/*; do
    ldd "$bin" | awk '/=>/ {print $1, $3}'
done | sort -u | while read -r name path; do
    case "$name" in
    linux-vdso* | libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | \
        libstdc++.so* | libgcc_s.so* | libcuda.so* | libcublas*.so* | libcudart*.so* | \
        libnccl.so*) continue ;;
    esac
    cp -L "$path" "$OUTB/lib/$name"
done
tar -cJf "$OUTB/libs.tar.xz" -C "$OUTB/lib" .
rm -rf "$OUTB/lib"
du -sh "$OUTB"/bin/* "$OUTB/libs.tar.xz"
echo "gpu-bundle: carry build-gpu/bundle to the GPU machine (bench/gpu-check.sh uses it)"

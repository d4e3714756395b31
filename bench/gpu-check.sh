#!/usr/bin/env bash
# gpu-check.sh OUT_DIR - the CUDA backend's checks on a machine with a GPU:
# builds (Release, CUDA on), runs the GPU unit tests (test_cuda) and the
# benchmarks (gpu_bench), and writes into OUT_DIR:
#
#   gpu-check.log     everything below, as it ran
#   env.txt           GPU, tools and libraries found
#   test_cuda.txt     the unit tests' output (and sanitizer reruns of failures)
#   gpu_bench.txt     benchmark table;  gpu_bench.json  the same as JSON
#   test_cuda_new_defaults.txt  the engine's tests with the one-row decode
#                     kernel and prefill attention 3 on (HX_CUDA_DECODE1=1,
#                     HX_CUDA_PREFILL_ATTN=3): whether they can be the defaults
#   gpu_bench_decode1.txt, .json  batch-1 decode with the one-row decode
#                     kernel (gpu_bench --decode1, a process of its own)
#   gpu_bench_prefill_fa.txt, .json  prefill with attention kernel 3 against 2
#                     (gpu_bench --prefill-fa, a process of its own)
#   serve.txt         tests/integration/test_serve.py with the GPU case (bundle
#                     or CMake builds, where python3 is there)
#   summary.txt       build mode, exit codes, seconds
#
# Build: none when bench/gpu-bundle.sh built the binaries beforehand and
# build-gpu/bundle was carried (the fastest: run it here first); else the
# project's own CMake build when it configures (every -dev package present). A bare GPU machine may lack the project's libraries; then
# it builds directly with gcc and nvcc only what the GPU checks need (the
# CUDA kernels and engine, runtime's model, safetensors, tiny-model, llama
# kvcache and protocol code, and common's JSON helpers), which needs jansson,
# OpenSSL's libcrypto and cmocka only: if their headers are missing too,
# Debian packages of them carried in build-hxdeps/ (apt-get download
# libjansson4 libjansson-dev libcmocka0 libcmocka-dev libssl-dev) are
# unpacked into a private prefix (nothing is installed; libcrypto itself is
# in every Debian image). Without cmocka the unit tests are skipped and it
# says so.
# Meant to finish within 8 minutes on one H100 (about 2-4 are usual).
set -u -o pipefail

OUT=${1:?usage: bench/gpu-check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${HX_GPU_BUILD_DIR:-/tmp/hx-gpu-check}
JOBS=$(nproc 2>/dev/null || echo 4)
START=$(date +%s)
exec > >(tee "$OUT/gpu-check.log") 2>&1

section() { echo; echo "== $* (t=$(( $(date +%s) - START ))s)"; }
export PATH=/usr/local/cuda/bin:$PATH

section environment
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    uname -srm
    for t in cmake make gcc nvcc pkg-config; do
        printf '%-11s %s\n' "$t" "$(command -v "$t" || echo MISSING)"
    done
    nvcc --version 2>/dev/null | tail -1
    for m in jansson libfyaml hwloc cmocka lapacke libcrypto libssh2 libmicrohttpd; do
        if pkg-config --exists "$m" 2>/dev/null; then s=found; else s=missing; fi
        printf 'pkg-config %-14s %s\n' "$m" "$s"
    done
} 2>&1 | tee "$OUT/env.txt"

mode=none
BIN=
BUNDLE=$SRC/build-gpu/bundle
if [ -x "$BUNDLE/bin/hexflow" ] && [ "${HX_GPU_CHECK_DIRECT:-0}" != 1 ]; then
    # binaries built beforehand by bench/gpu-bundle.sh (carried): nothing to build here
    section "prebuilt bundle (bench/gpu-bundle.sh)"
    LIBS=/tmp/hx-gpu-libs
    mkdir -p "$LIBS"
    tar -xJf "$BUNDLE/libs.tar.xz" -C "$LIBS"
    export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    if "$BUNDLE/bin/hexflow" --version | tee /dev/stderr | grep -q cuda; then
        mode=bundle
        BIN=$BUNDLE/bin
    else
        echo "the bundled hexflow does not run here or has no cuda backend: building instead"
    fi
fi
if [ "$mode" = none ] && [ "${HX_GPU_CHECK_DIRECT:-0}" != 1 ] && command -v cmake >/dev/null; then
    section "configure: the project's CMake build"
    if cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DHX_WITH_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 >"$OUT/cmake.txt" 2>&1 &&
        grep -q "CUDA backend: ON" "$OUT/cmake.txt"; then
        section "build (make -j$JOBS test_cuda gpu_bench hexflow)"
        if make -C "$BUILD" -j"$JOBS" test_cuda gpu_bench hexflow 2>&1 | tail -25; then
            mode=cmake
            BIN=$BUILD
        fi
    else
        tail -15 "$OUT/cmake.txt"
        echo "cmake configure failed (missing -dev packages?): building directly"
    fi
fi

if [ "$mode" = none ]; then
    section "direct build with gcc and nvcc (only what the GPU checks need)"
    DEPS=/tmp/hx-gpu-deps
    B=$BUILD-direct
    mkdir -p "$B" "$DEPS"
    have_header() { echo "#include <$1>" | gcc -E -x c - -I"$DEPS/usr/include" >/dev/null 2>&1; }
    if ! have_header jansson.h || ! have_header cmocka.h || ! have_header openssl/evp.h; then
        if ls "$SRC"/build-hxdeps/*.deb >/dev/null 2>&1; then
            for d in "$SRC"/build-hxdeps/*.deb; do dpkg -x "$d" "$DEPS"; done
            echo "unpacked $(ls "$SRC"/build-hxdeps/*.deb | wc -l) carried .deb files into $DEPS"
        fi
    fi
    LIBDIR=$DEPS/usr/lib/x86_64-linux-gnu
    have_header jansson.h || echo "jansson.h: missing (nothing can be built)"
    with_cmocka=0
    have_header cmocka.h && with_cmocka=1
    # the toolkit's libraries: /usr/local/cuda first, then wherever else they are
    find_lib() {
        for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
            /usr/lib/x86_64-linux-gnu; do
            [ -e "$d/$1" ] && { echo "$d"; return; }
        done
        find / -xdev -name "$1" -path '*nvidia*' 2>/dev/null | head -1 | xargs -r dirname
    }
    CUBLAS_DIR=$(find_lib libcublas.so)
    [ -n "$CUBLAS_DIR" ] || CUBLAS_DIR=$(find_lib libcublas.so.13)
    CUDART_DIR=$(find_lib libcudart.so)
    echo "cublas: ${CUBLAS_DIR:-MISSING}  cudart: ${CUDART_DIR:-MISSING}"
    NCCL_DEF=
    NCCL_LIB=
    NCCL_DIR=$(find_lib libnccl.so)
    NCCL_H=
    for h in /usr/local/cuda/include/nccl.h /usr/include/nccl.h /usr/local/include/nccl.h; do
        [ -f "$h" ] && { NCCL_H=$h; break; }
    done
    if [ -n "$NCCL_H" ] && [ -n "$NCCL_DIR" ]; then
        NCCL_DEF="-DHX_HAVE_NCCL=1 -I$(dirname "$NCCL_H")"
        NCCL_LIB="-L$NCCL_DIR -Wl,-rpath,$NCCL_DIR -lnccl"
    fi
    echo "nccl: library ${NCCL_DIR:-not found}, header ${NCCL_H:-not found}"
    CFLAGS="-std=c11 -O2 -D_POSIX_C_SOURCE=200809L -I$SRC -I$DEPS/usr/include -I/usr/local/cuda/include"
    C_SRCS="common/status.c common/file.c common/json.c common/text.c planner/model.c
            runtime/safetensors.c runtime/tiny.c runtime/llama.c runtime/kvcache.c runtime/proto.c
            kernels/cpu/cpu.c kernels/cpu/paged.c runtime/batch.c runtime/cuda_engine.c
            topo/catalog.c"
    CU_SRCS="probe device gemm ops attention sample nccl decode1"
    ok=1
    pids=()
    for f in $C_SRCS; do
        o=$B/$(echo "$f" | tr / _).o
        gcc $CFLAGS -c "$SRC/$f" -o "$o" & pids+=($!)
    done
    for f in $CU_SRCS; do
        nvcc -std=c++17 -O3 -arch=sm_90 -I"$SRC" $NCCL_DEF -c "$SRC/kernels/cuda/$f.cu" \
            -o "$B/cuda_$f.o" & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || ok=0; done
    CUBLAS_LINK="-lcublas"
    [ -e "$CUBLAS_DIR/libcublas.so" ] || CUBLAS_LINK="$CUBLAS_DIR/libcublas.so.13"
    LIBS="-L$LIBDIR -Wl,-rpath,$LIBDIR -ljansson -L$CUBLAS_DIR -Wl,-rpath,$CUBLAS_DIR $CUBLAS_LINK
          -L$CUDART_DIR -Wl,-rpath,$CUDART_DIR -lcudart $NCCL_LIB -l:libcrypto.so.3 -lm -lpthread -ldl"
    OBJS=$(ls "$B"/*.o | grep -v -e '/test_cuda.o$' -e '/gpu_bench.o$')
    if [ "$ok" = 1 ]; then
        gcc $CFLAGS -c "$SRC/bench/gpu_bench.c" -o "$B/gpu_bench.o" &&
            g++ -o "$B/gpu_bench" "$B/gpu_bench.o" $OBJS $LIBS || ok=0
        if [ "$with_cmocka" = 1 ]; then
            gcc $CFLAGS -DHX_SOURCE_DIR="\"$SRC\"" -c "$SRC/tests/unit/test_cuda.c" \
                -o "$B/test_cuda.o" &&
                g++ -o "$B/test_cuda" "$B/test_cuda.o" $OBJS $LIBS -lcmocka || ok=0
        else
            echo "cmocka.h: missing: the unit tests are not built"
        fi
    fi
    if [ "$ok" = 1 ]; then
        mode=direct
        BIN=$B
    fi
fi

rc_test=-1
rc_bench=-1
if [ -n "$BIN" ] && [ -x "$BIN/test_cuda" ]; then
    section "unit tests: test_cuda"
    # the kernels never run on a GPU before this check in processes of their own (a
    # fault in one ends the CUDA context of every test after it): the one-row decode
    # kernel (hx_cuda_decode1), prefill attention 3
    NEW_TESTS=("*decode1*" "test_prefill_attention_fa,test_engine_prefill_others")
    skip=$(IFS=,; echo "${NEW_TESTS[*]}")
    (cd "$BIN" && CMOCKA_MESSAGE_OUTPUT=stdout HX_CUDA_TEST_SKIP="$skip" timeout 120 \
        ./test_cuda) 2>&1 | tee "$OUT/test_cuda.txt"
    rc_test=${PIPESTATUS[0]}
    for pat in "${NEW_TESTS[@]}"; do
        section "unit tests: test_cuda $pat"
        (cd "$BIN" && CMOCKA_MESSAGE_OUTPUT=stdout HX_CUDA_TEST_FILTER="$pat" timeout 90 \
            ./test_cuda) 2>&1 | tee -a "$OUT/test_cuda.txt"
        rc_new=${PIPESTATUS[0]}
        [ "$rc_test" = 0 ] && rc_test=$rc_new
    done
    # the engine's tests with those kernels as the defaults would make them (for the
    # decision; not in the exit status)
    section "unit tests: the engine with HX_CUDA_DECODE1=1 HX_CUDA_PREFILL_ATTN=3"
    (cd "$BIN" && CMOCKA_MESSAGE_OUTPUT=stdout HX_CUDA_DECODE1=1 HX_CUDA_PREFILL_ATTN=3 \
        HX_CUDA_TEST_FILTER='test_engine_*' \
        HX_CUDA_TEST_SKIP='test_engine_decode1,test_engine_prefill_others' timeout 120 \
        ./test_cuda) 2>&1 | tee "$OUT/test_cuda_new_defaults.txt"
    rc_new_defaults=${PIPESTATUS[0]}
    failed=$(grep -o '^\[  FAILED  \] test_[a-z0-9_]*' "$OUT/test_cuda.txt" | awk '{print $4}' | sort -u | head -2)
    for t in $failed; do
        section "rerun without programmatic dependent launch (HX_CUDA_PDL=0): $t"
        (cd "$BIN" && HX_CUDA_PDL=0 HX_CUDA_TEST_FILTER=$t timeout 40 ./test_cuda) 2>&1 |
            tail -15 | tee -a "$OUT/test_cuda.txt"
        if command -v compute-sanitizer >/dev/null; then
            section "compute-sanitizer memcheck: $t"
            (cd "$BIN" && HX_CUDA_TEST_FILTER=$t timeout 40 compute-sanitizer --tool memcheck \
                --print-limit 10 ./test_cuda) 2>&1 | tail -40 | tee -a "$OUT/test_cuda.txt"
        fi
    done
    # the kernels not yet checked on a GPU before this run: shared-memory races and
    # barrier misuse of their pipelines (small cases, seconds each)
    if command -v compute-sanitizer >/dev/null; then
        for t in test_prefill_attention_fa test_decode1; do
            for tool in racecheck synccheck; do
                section "compute-sanitizer $tool: $t"
                (cd "$BIN" && HX_CUDA_TEST_FILTER=$t timeout 60 compute-sanitizer --tool $tool \
                    --print-limit 10 ./test_cuda) 2>&1 | tail -15 | tee -a "$OUT/test_cuda.txt"
            done
        done
        # and out-of-bounds accesses of the newer kernels (bf16 KV segments, the fused
        # q/k/v + RoPE GEMV, L2 prefetches on a forked stream)
        for t in test_kv_pack_unpack test_gemm_rmsnorm_rope_kv test_stream_fork_join \
            test_decode1; do
            section "compute-sanitizer memcheck: $t"
            (cd "$BIN" && HX_CUDA_TEST_FILTER=$t timeout 60 compute-sanitizer --tool memcheck \
                --print-limit 10 ./test_cuda) 2>&1 | tail -15 | tee -a "$OUT/test_cuda.txt"
        done
    fi
fi
if [ -n "$BIN" ] && [ -x "$BIN/gpu_bench" ]; then
    section "benchmarks: gpu_bench"
    (cd "$BIN" && timeout 140 ./gpu_bench --micro --json "$OUT/gpu_bench.json" \
        --calibration "$OUT/calibration.json") 2>&1 |
        tee "$OUT/gpu_bench.txt"
    rc_bench=${PIPESTATUS[0]}
    section "benchmarks: gpu_bench --decode1 (the one-row decode kernel, batch 1)"
    (cd "$BIN" && timeout 90 ./gpu_bench --decode1 --json "$OUT/gpu_bench_decode1.json") 2>&1 |
        tee "$OUT/gpu_bench_decode1.txt"
    rc_d1b=${PIPESTATUS[0]}
    [ "$rc_bench" = 0 ] && rc_bench=$rc_d1b
    section "benchmarks: gpu_bench --prefill-fa (prefill attention 3 against 2)"
    (cd "$BIN" && timeout 90 ./gpu_bench --prefill-fa --json "$OUT/gpu_bench_prefill_fa.json") \
        2>&1 | tee "$OUT/gpu_bench_prefill_fa.txt"
    rc_fab=${PIPESTATUS[0]}
    [ "$rc_bench" = 0 ] && rc_bench=$rc_fab
fi

rc_serve=-1
if [ -n "$BIN" ] && [ -x "$BIN/hexflow" ] && command -v python3 >/dev/null; then
    # GPU prefill groups feeding GPU decode groups in processes on this GPU (stages, TP
    # slices, NCCL), each compared with `hexflow generate`
    # (its CPU cases run in CI: only the GPU ones here, unless HX_SERVE_GPU_ONLY=0)
    section "serving: tests/integration/test_serve.py (GPU prefill -> GPU decode)"
    HX_SERVE_GPU_ONLY=${HX_SERVE_GPU_ONLY-1} \
        timeout 300 python3 "$SRC/tests/integration/test_serve.py" "$BIN/hexflow" 2>&1 |
        tee "$OUT/serve.txt"
    rc_serve=${PIPESTATUS[0]}
fi

section summary
{
    echo "build: $mode"
    echo "test_serve exit: $rc_serve (-1: not run)"
    echo "test_cuda exit: $rc_test (-1: not run)"
    echo "test_cuda, engine with the new kernels as defaults: ${rc_new_defaults:--1}"
    echo "gpu_bench exit: $rc_bench (-1: not run)"
    # what decides the defaults, at a glance (the tail of this script's output)
    echo "failed tests: $(grep -ho '^\[  FAILED  \] test_[a-z0-9_]*' "$OUT"/test_cuda*.txt \
        2>/dev/null | awk '{print $4}' | sort -u | tr '\n' ' ')"
    grep -h -e '^decode  graphs (defaults) *batch   1' -e 'decode1' -e 'one-row kernel' \
        -e '^prefill' "$OUT/gpu_bench.txt" "$OUT/gpu_bench_decode1.txt" "$OUT/gpu_bench_prefill_fa.txt" \
        2>/dev/null | cut -c1-150
    echo "seconds: $(( $(date +%s) - START ))"
} | tee "$OUT/summary.txt"
[ "$rc_test" = 0 ] && [ "$rc_bench" = 0 ]

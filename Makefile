# hexflow - thin wrapper over CMake.
#   make        build (build/hexflow)
#   make test   install missing Debian packages, build, run the tests
#   make demo   install missing Debian packages, build, run the shipped example
#               (and the cuda backend's host code over the host emulation of its
#               kernels: test_cuda and the serving test's GPU cases, in build-emu)
#   make asan   the tests again under AddressSanitizer + UndefinedBehaviorSanitizer
#   make tsan   the tests again under ThreadSanitizer (not in CI: see the target)
#   make bench  the planner's benchmarks (bench/plan_bench.c; prints numbers)
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
EMU_BUILD ?= build-emu
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
WERROR ?= OFF
CMAKE_FLAGS ?=

HEXFLOW = $(BUILD)/hexflow

.PHONY: all build deps test emu-test demo bench asan tsan clean

all: build

deps:
	@scripts/install-deps.sh

build:
	@cmake -S . -B $(BUILD) -DHX_WERROR=$(WERROR) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

test: deps build
	@ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory emu-test EMU_DIR=$(EMU_BUILD) EMU_FLAGS=

# The cuda backend's host code (engine, backend, worker) over kernels/cuda_emu.
EMU_TESTS = '^(test_cuda|serve)$$'
emu-test:
	@cmake -S . -B $(EMU_DIR) -DHX_CUDA_EMU=ON -DHX_WERROR=$(WERROR) $(EMU_FLAGS) \
	    $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(EMU_DIR) -j $(JOBS) --target hexflow test_cuda
	@HX_SERVE_GPU_ONLY=1 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    ctest --test-dir $(EMU_DIR) --output-on-failure -j $(JOBS) -R $(EMU_TESTS)

asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DHX_SANITIZE=ON -DHX_WERROR=$(WERROR) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory emu-test EMU_DIR=$(EMU_BUILD)-asan EMU_FLAGS=-DHX_SANITIZE=ON

# ThreadSanitizer: OpenBLAS's own threads (not instrumented) would be reported, so it runs
# on one; test_host is left out, since ThreadSanitizer crashes in the thread that glibc's
# getaddrinfo_a starts behind its back.
tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DHX_TSAN=ON -DHX_WERROR=$(WERROR) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS)
	@OPENBLAS_NUM_THREADS=1 ctest --test-dir $(TSAN_BUILD) --output-on-failure -j $(JOBS) \
	    -E '^test_host$$'
	@OPENBLAS_NUM_THREADS=1 $(MAKE) --no-print-directory emu-test EMU_DIR=$(EMU_BUILD)-tsan \
	    EMU_FLAGS=-DHX_TSAN=ON

demo: deps build
	@echo '$$ hexflow inventory show inventories/mixed.yaml'
	@$(HEXFLOW) inventory show inventories/mixed.yaml
	@echo
	@echo '$$ hexflow plan --inventory inventories/mixed.yaml --model llama-2-70b --out build/plan.json'
	@$(HEXFLOW) plan --inventory inventories/mixed.yaml --model llama-2-70b --out $(BUILD)/plan.json
	@echo
	@echo '$$ hexflow simulate --plan build/plan.json'
	@$(HEXFLOW) simulate --plan $(BUILD)/plan.json
	@echo
	@echo '# and for real, on this machine: a tiny random-weight model on two CPU devices'
	@scripts/demo-serve.sh $(HEXFLOW) $(BUILD)

bench: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DHX_WERROR=$(WERROR) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target plan_bench cpu_bench proto_bench batch_bench
	@$(BUILD)/plan_bench all
	@$(BUILD)/cpu_bench
	@$(BUILD)/proto_bench
	@$(BUILD)/batch_bench

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(EMU_BUILD) $(EMU_BUILD)-asan $(EMU_BUILD)-tsan

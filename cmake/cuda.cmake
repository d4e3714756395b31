# CUDA kernels and backend: built when the toolkit was found (HX_HAVE_CUDA), or over
# the host emulation of the kernels (HX_CUDA_EMU, for tests on machines without a GPU).
#
#   hx_kernels_cuda  kernels/cuda: bf16 kernels (.cu), cuBLAS GEMMs, CUDA graphs, NCCL
#                    wrappers (when nccl.h and libnccl are found). Header: kernels/cuda.h.
#                    With HX_CUDA_EMU: kernels/cuda_emu, the same functions in plain C on
#                    the host (device memory is host memory; NCCL over Unix sockets).
#   the cuda backend runtime/cuda_engine.c (plain C over kernels/cuda.h), added to
#                    hx_runtime. Header: runtime/cuda_engine.h.
#   test_cuda        unit tests (cmocka); every test skips, saying so, without a GPU.
#   gpu_bench        benchmarks on a random-weight 1B-class model (not built by default).
if(HX_HAVE_CUDA)
  add_library(hx_kernels_cuda STATIC
    kernels/cuda/probe.cu kernels/cuda/device.cu kernels/cuda/gemm.cu kernels/cuda/ops.cu
    kernels/cuda/attention.cu kernels/cuda/sample.cu kernels/cuda/nccl.cu
    kernels/cuda/decode1.cu)
  target_include_directories(hx_kernels_cuda PUBLIC ${CMAKE_SOURCE_DIR})
  target_link_libraries(hx_kernels_cuda PUBLIC hx_common CUDA::cudart_static CUDA::cublas)
  set_target_properties(hx_kernels_cuda PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
  target_compile_options(hx_kernels_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>)
  if(HX_WERROR)
    target_compile_options(hx_kernels_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings>)
  endif()

  # NCCL ships with some toolkits (/usr/local/cuda/include, /usr/local/cuda/lib) or apart.
  find_path(HX_NCCL_INCLUDE_DIR nccl.h
    HINTS ${CUDAToolkit_INCLUDE_DIRS} ${CUDAToolkit_TARGET_DIR}/include /usr/local/cuda/include)
  find_library(HX_NCCL_LIBRARY nccl
    HINTS ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_TARGET_DIR}/lib ${CUDAToolkit_TARGET_DIR}/lib64
          /usr/local/cuda/lib /usr/local/cuda/lib64)
  if(HX_NCCL_INCLUDE_DIR AND HX_NCCL_LIBRARY)
    message(STATUS "hexflow: NCCL: ${HX_NCCL_LIBRARY}")
    target_include_directories(hx_kernels_cuda PRIVATE ${HX_NCCL_INCLUDE_DIR})
    target_compile_definitions(hx_kernels_cuda PRIVATE HX_HAVE_NCCL=1)
    target_link_libraries(hx_kernels_cuda PUBLIC ${HX_NCCL_LIBRARY})
  else()
    message(STATUS "hexflow: NCCL: not found (the NCCL wrappers report HX_ENOTSUP)")
  endif()
  set(HX_CUDA_LINKER CUDA)
elseif(HX_CUDA_EMU)
  add_library(hx_kernels_cuda STATIC kernels/cuda_emu/emu.c kernels/cuda_emu/nccl.c)
  target_include_directories(hx_kernels_cuda PUBLIC ${CMAKE_SOURCE_DIR})
  target_compile_definitions(hx_kernels_cuda PRIVATE _GNU_SOURCE)
  target_link_libraries(hx_kernels_cuda PUBLIC hx_common hx_kernels_cpu Threads::Threads
                                               ${HX_LIBM})
  set(HX_CUDA_LINKER C)
else()
  return()
endif()

target_sources(hx_runtime PRIVATE ${CMAKE_SOURCE_DIR}/runtime/cuda_engine.c)
target_link_libraries(hx_runtime PUBLIC hx_kernels_cuda)
target_compile_definitions(hx_runtime PRIVATE HX_HAVE_CUDA=1)
target_link_libraries(hexflow PRIVATE hx_kernels_cuda)
target_compile_definitions(hexflow PRIVATE HX_HAVE_CUDA=1)
if(HX_CUDA_EMU)
  target_compile_definitions(hexflow PRIVATE HX_CUDA_EMU=1)
endif()
set_target_properties(hexflow PROPERTIES LINKER_LANGUAGE ${HX_CUDA_LINKER})

if(CMOCKA_FOUND)
  hx_unit_test(test_cuda)
  target_link_libraries(test_cuda PRIVATE hx_kernels_cuda)
  if(HX_CUDA_EMU)
    target_compile_definitions(test_cuda PRIVATE HX_CUDA_EMU=1)
  endif()
  set_target_properties(test_cuda PROPERTIES LINKER_LANGUAGE ${HX_CUDA_LINKER})
endif()

add_executable(gpu_bench EXCLUDE_FROM_ALL bench/gpu_bench.c)
target_link_libraries(gpu_bench PRIVATE hx_kernels_cuda hx_runtime hx_topo)
set_target_properties(gpu_bench PROPERTIES LINKER_LANGUAGE ${HX_CUDA_LINKER})

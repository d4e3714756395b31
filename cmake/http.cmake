# The router's HTTP front (libmicrohttpd) and the Prometheus metrics registry.
pkg_check_modules(MHD REQUIRED IMPORTED_TARGET libmicrohttpd)
target_sources(hx_runtime PRIVATE
  ${CMAKE_SOURCE_DIR}/runtime/http.c
  ${CMAKE_SOURCE_DIR}/runtime/metrics.c)
target_link_libraries(hx_runtime PUBLIC PkgConfig::MHD)
if(COMMAND hx_unit_test)
  hx_unit_test(test_http)
endif()

# The launcher (libssh2): sessions to hosts (local or SSH), file push, and the
# network-namespace SSH test harness (tests/integration/netns.sh).
pkg_check_modules(LIBSSH2 REQUIRED IMPORTED_TARGET libssh2)

add_library(hx_launcher STATIC launcher/host.c launcher/local.c launcher/ssh.c)
# getaddrinfo_a (name resolution under a deadline) lives in libanl before glibc 2.34.
find_library(HX_LIBANL anl)
target_link_libraries(hx_launcher PUBLIC hx_common PRIVATE PkgConfig::LIBSSH2 OpenSSL::Crypto
                      Threads::Threads)
if(HX_LIBANL)
  target_link_libraries(hx_launcher PRIVATE ${HX_LIBANL})
endif()

# Benchmark: parallel SSH session setup (bench/ssh_bench.sh runs it over netns hosts).
add_executable(ssh_bench EXCLUDE_FROM_ALL bench/ssh_bench.c)
target_link_libraries(ssh_bench PRIVATE hx_launcher hx_common Threads::Threads)

if(CMOCKA_FOUND)
  # Local host tests always; the SSH tests run when tests/integration/test_ssh.sh
  # has set up network namespaces (test_host_ssh below) and skip otherwise.
  hx_unit_test(test_host)
  target_link_libraries(test_host PRIVATE hx_launcher Threads::Threads)
  add_test(NAME test_host_ssh
           COMMAND ${CMAKE_SOURCE_DIR}/tests/integration/test_ssh.sh $<TARGET_FILE:test_host>)
  set_tests_properties(test_host_ssh PROPERTIES
    ENVIRONMENT "CMOCKA_MESSAGE_OUTPUT=stdout"
    SKIP_RETURN_CODE 77
    TIMEOUT 300)
endif()

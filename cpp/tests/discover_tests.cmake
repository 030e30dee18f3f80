# Included by ctest when it starts (the TEST_INCLUDE_FILES of cpp/tests): one entry per case
# that `cnnbp_tests --list` prints, plus the re-runs on narrower instruction sets.
#   CNNBP_TEST_EXECUTABLE  the cnnbp_tests program
#   CNNBP_TEST_RERUNS      "PREFIX=isa,isa..." items (test_entries.cmake)
#   CNNBP_CMAKE_COMMAND    cmake (ctest does not define CMAKE_COMMAND here)
# When the program is missing or cannot list its cases, a failing entry says so: the suite
# never passes by running nothing.
include(${CMAKE_CURRENT_LIST_DIR}/test_entries.cmake)

function(cnnbp_discovery_failed why)
  add_test([==[cnnbp_tests discovery]==] "${CNNBP_CMAKE_COMMAND}" -E echo "${why}")
  set_tests_properties([==[cnnbp_tests discovery]==] PROPERTIES WILL_FAIL TRUE)
endfunction()

if(NOT EXISTS "${CNNBP_TEST_EXECUTABLE}")
  cnnbp_discovery_failed("not built: ${CNNBP_TEST_EXECUTABLE}")
  return()
endif()
execute_process(COMMAND "${CNNBP_TEST_EXECUTABLE}" --list RESULT_VARIABLE _rc
                OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0 OR _out STREQUAL "")
  cnnbp_discovery_failed("'${CNNBP_TEST_EXECUTABLE} --list' failed (${_rc}): ${_err}")
  return()
endif()

cnnbp_test_lines("${_out}" _names)
foreach(_name IN LISTS _names)
  string(REPLACE "${cnnbp_semicolon}" ";" _name "${_name}")  # quoted, it stays one argument
  string(REGEX MATCH "^[A-Za-z0-9_]+" _group "${_name}")
  add_test("${_name}" "${CNNBP_TEST_EXECUTABLE}" --exact "${_name}")
  set_tests_properties("${_name}" PROPERTIES LABELS "${_group}")
  cnnbp_test_reruns("${_name}" "${CNNBP_TEST_RERUNS}" _isas)
  foreach(_isa IN LISTS _isas)
    cnnbp_test_rerun_name("${_name}" ${_isa} _rerun)
    add_test("${_rerun}" "${CNNBP_TEST_EXECUTABLE}" --exact "${_name}")
    set_tests_properties("${_rerun}" PROPERTIES ENVIRONMENT "CNNBP_ISA=${_isa}"
                         LABELS "${_group};isa_${_isa}")
  endforeach()
endforeach()

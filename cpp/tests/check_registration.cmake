# ctest entry ctest_runs_every_case: every case the runner holds has a ctest entry that runs
# it, and every re-run on a narrower instruction set is there too. It reads what ctest would
# run (`ctest -N -V` in this directory, the discovery included) independently of how the
# entries were made, so a case that no entry runs fails here.
#   cmake -DCTEST=... -DEXECUTABLE=... -DRERUNS=prefix=isa,isa|... -DCONFIG=...
#         -P check_registration.cmake
include(${CMAKE_CURRENT_LIST_DIR}/test_entries.cmake)

function(run out)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE stdout ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${err}")
  endif()
  cnnbp_test_lines("${stdout}" lines)
  set(${out} "${lines}" PARENT_SCOPE)
endfunction()
run(cases "${EXECUTABLE}" --list)
run(listing "${CTEST}" -N -V -C "${CONFIG}")

# `ctest -N -V` prints, for test K: "K: Test command: PROGRAM "ARG"...", for an environment
# "K: Environment variables: " and "K:  VAR=VALUE" lines, then "  Test #K: NAME".
foreach(line IN LISTS listing)
  string(REPLACE "${cnnbp_semicolon}" ";" line "${line}")
  if(line MATCHES "^[0-9]+: Test command: (.*)$")
    set(command "${CMAKE_MATCH_1}")
    set(environment "")
  elseif(line MATCHES "^[0-9]+:  ([A-Za-z_][A-Za-z0-9_]*=.*)$")
    string(APPEND environment " ${CMAKE_MATCH_1}")
  elseif(line MATCHES "^ *Test +#[0-9]+: (.*)$")
    string(MD5 key "${CMAKE_MATCH_1}")
    set(command_${key} "${command}")
    set(environment_${key} "${environment}")
    set(seen_${key} TRUE)
  endif()
endforeach()

set(problems "")
set(entries 0)
# An entry called `name` runs `EXECUTABLE --exact case` in `environment`.
function(expect name environment)
  string(MD5 key "${name}")
  if(NOT seen_${key})
    string(APPEND problems "\n  no ctest entry '${name}'")
  elseif(NOT command_${key} MATCHES "\"--exact\" \"(.*)\"$" OR NOT CMAKE_MATCH_1 STREQUAL case)
    string(APPEND problems "\n  '${name}' runs: ${command_${key}}")
  elseif(NOT environment_${key} STREQUAL environment)
    string(APPEND problems "\n  '${name}' has environment '${environment_${key}}'")
  endif()
  math(EXPR entries "${entries} + 1")
  set(problems "${problems}" PARENT_SCOPE)
  set(entries ${entries} PARENT_SCOPE)
endfunction()

string(REPLACE "|" ";" reruns "${RERUNS}")
list(LENGTH cases count)
foreach(case IN LISTS cases)
  string(REPLACE "${cnnbp_semicolon}" ";" case "${case}")
  expect("${case}" "")
  cnnbp_test_reruns("${case}" "${reruns}" isas)
  foreach(isa IN LISTS isas)
    cnnbp_test_rerun_name("${case}" ${isa} rerun)
    expect("${rerun}" " CNNBP_ISA=${isa}")
  endforeach()
endforeach()

if(count EQUAL 0)
  message(FATAL_ERROR "'${EXECUTABLE} --list' listed no case")
endif()
if(problems)
  message(FATAL_ERROR "cases that ctest does not run as it should:${problems}")
endif()
message(STATUS "${count} cases, ${entries} ctest entries run them")

# What discover_tests.cmake registers and check_registration.cmake expects, in one place.

# ';' is CMake's list separator but may stand in a case name: a name travels through lists
# with it replaced by a control character (the runner refuses names that hold one).
string(ASCII 1 cnnbp_semicolon)

# The lines of `text` as a list (';' replaced, see above).
function(cnnbp_test_lines text out)
  string(REGEX REPLACE "\n$" "" text "${text}")
  string(REPLACE ";" "${cnnbp_semicolon}" text "${text}")
  string(REPLACE "\n" ";" text "${text}")
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

# The instruction sets the case `name` runs on again, from `reruns`, a list of
# "PREFIX=isa,isa..." items: the cases whose name starts with PREFIX run with each CNNBP_ISA.
function(cnnbp_test_reruns name reruns out)
  set(isas "")
  foreach(rerun IN LISTS reruns)
    if(rerun MATCHES "^([^=]+)=(.*)$")
      string(FIND "${name}" "${CMAKE_MATCH_1}" at)
      if(at EQUAL 0)
        string(REPLACE "," ";" more "${CMAKE_MATCH_2}")
        list(APPEND isas ${more})
      endif()
    endif()
  endforeach()
  set(${out} "${isas}" PARENT_SCOPE)
endfunction()

# The ctest entry of case `name` re-run on `isa`.
function(cnnbp_test_rerun_name name isa out)
  set(${out} "${name} [CNNBP_ISA=${isa}]" PARENT_SCOPE)
endfunction()

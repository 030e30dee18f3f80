# ctest script: install the build tree into a scratch prefix, build examples/cpp against it
# with find_package(cnnbp), and run the example (which checks its own gradients).
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=... -DCXX=...
#         -DCXX_FLAGS=... -DBUILD_TYPE=... -P test_install_example.cmake
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix --config ${BUILD_TYPE})
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/cpp -B ${WORK_DIR}/build -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DCMAKE_CXX_COMPILER=${CXX}
    -DCMAKE_CXX_FLAGS=${CXX_FLAGS} -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build --config ${BUILD_TYPE})
find_program(example train_seed_network PATHS ${WORK_DIR}/build ${WORK_DIR}/build/${BUILD_TYPE}
             NO_DEFAULT_PATH REQUIRED)
run(${example})
if(NOT last_output MATCHES "step 5: L = " OR NOT last_output MATCHES "dL/dW1 ")
  message(FATAL_ERROR "unexpected output:\n${last_output}")
endif()
message(STATUS "${last_output}")

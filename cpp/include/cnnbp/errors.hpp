// cnnbp/errors.hpp -- the exceptions cnnbp throws besides std::invalid_argument (a value
// out of range or a shape that does not fit: ValueError in Python) and std::logic_error
// (a call out of order).
#pragma once

#include <stdexcept>
#include <string>

namespace cnnbp {

// An argument of the wrong kind (a float where an int belongs, a string for a pair): a
// std::invalid_argument to C++ callers, TypeError in Python.
struct argument_type_error : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// A file that could not be written: OSError in Python.
struct io_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace cnnbp

// cnnbp/errors.hpp -- what cnnbp throws, and what it is in Python:
//   std::invalid_argument  a bad argument: a shape that does not fit, a value out of range,
//                          a file that cannot be read or is not a valid model (ValueError)
//   argument_type_error    an argument of the wrong kind, a std::invalid_argument (TypeError)
//   std::out_of_range      an index past the end: model[99] (IndexError)
//   std::logic_error       a call in the wrong state: backward before forward, an object in
//                          use by another thread (RuntimeError)
//   io_error               a file that could not be written, a std::runtime_error (OSError)
// Every message starts with the op or class that refused: "[Sequential] index: expected < 12,
// got 99".
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

// The paths conv2d's plan chooses for given dims (float), by name: for tests that pin which
// shapes take which path.
#pragma once

#include <array>

#include "cnnbp/shapes.hpp"

namespace cnnbp::detail {

// {forward, dinput, dweight} path names, e.g. {"forward_padded", "dinput_polyphase",
// "dweight_padded"}; the dims as conv2d_dims gives them (before the group view).
std::array<const char*, 3> conv2d_path_names(const Conv2dDims& d);

}  // namespace cnnbp::detail

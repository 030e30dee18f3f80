// The paths conv2d's plan chooses for given dims (float), by name: for tests that pin which
// shapes take which path.
#pragma once

#include <array>
#include <cstdint>

#include "cnnbp/shapes.hpp"

namespace cnnbp::detail {

// {forward, dinput, dweight} path names, e.g. {"forward_padded", "dinput_polyphase",
// "dweight_padded"}; the dims as conv2d_dims gives them (before the group view).
std::array<const char*, 3> conv2d_path_names(const Conv2dDims& d);

// How many images forward_padded lays side by side on one stack for these dims (float), 1
// when it takes them one at a time.
int64_t conv2d_images_side_by_side(const Conv2dDims& d);

}  // namespace cnnbp::detail

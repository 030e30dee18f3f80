// cnnbp/pool2d.hpp -- 2-D max and average pooling, forward and backward, with PyTorch's
// semantics.
//
// Dimension letters: N batch, C channels, H/W input, P/Q output. Dense C-contiguous NCHW.
// Outputs are overwritten.
#pragma once

#include <cstdint>

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// output[n,c,p,q] = max of the window of input plane (n,c) starting at (p*sh-ph, q*sw-pw),
// whose taps lie dilation_h rows and dilation_w columns apart, padding counting as -inf
// (a ceil_mode window that hangs past the padding is clipped the same way). indices (N, C, P, Q)
// receives the flat position h*W+w of the chosen cell within its plane. As torch: a tie keeps the
// first cell in row-major order, a NaN is always taken (the last NaN of a window wins), an all -inf
// window reports its first in-bounds cell.
template <typename T>
void max_pool2d_forward(T* output, int64_t* indices, const T* input, const Pool2dDims& dims);

// dinput (N, C, H, W) = doutput scattered to the cells named by indices, zero elsewhere;
// windows that chose the same cell add up. Indices must have passed check_pool_indices().
template <typename T>
void max_pool2d_backward(T* dinput, const T* doutput, const int64_t* indices,
                         const Pool2dDims& dims);

// output[n,c,p,q] = (sum of the in-bounds cells of the window of input plane (n,c) starting
// at (p*sh-ph, q*sw-pw)) / divisor, as torch's avg_pool2d: the divisor is divisor_override
// when set; else with count_include_pad the window's cells inside the padded input (the
// whole window, except a ceil_mode window hanging past the right padding), without it the
// window's cells inside the input. Each window is summed in row-major order, as torch does.
// The params' dilation must be 1 (torch's avg_pool2d has none).
template <typename T>
void avg_pool2d_forward(T* output, const T* input, const Pool2dDims& dims);

// dinput (N, C, H, W): each cell receives doutput / divisor from every window that covers it
// (zero for cells no window covers), added in row-major order of the windows.
// Inverts `output = sum(window) / divisor` (the forward's divisor).
template <typename T>
void avg_pool2d_backward(T* dinput, const T* doutput, const Pool2dDims& dims);

}  // namespace cnnbp

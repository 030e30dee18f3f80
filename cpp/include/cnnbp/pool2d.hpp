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
// padding counting as -inf. indices (N, C, P, Q) receives the flat position h*W+w of the
// chosen cell within its plane. As torch: a tie keeps the first cell in row-major order,
// a NaN is always taken (the last NaN of a window wins), an all -inf window reports its
// first in-bounds cell.
template <typename T>
void max_pool2d_forward(T* output, int64_t* indices, const T* input, const Pool2dDims& dims);

// dinput (N, C, H, W) = doutput scattered to the cells named by indices, zero elsewhere;
// windows that chose the same cell add up. Indices must have passed check_pool_indices().
template <typename T>
void max_pool2d_backward(T* dinput, const T* doutput, const int64_t* indices,
                         const Pool2dDims& dims);

// output[n,c,p,q] = (sum of the in-bounds cells of the window of input plane (n,c) starting
// at (p*sh-ph, q*sw-pw)) / (kernel_h * kernel_w): padding counts as zeros and the divisor is
// always the full window, as torch's avg_pool2d with count_include_pad=True and
// ceil_mode=False. Each window is summed in row-major order, as torch does.
template <typename T>
void avg_pool2d_forward(T* output, const T* input, const Pool2dDims& dims);

// dinput (N, C, H, W): each cell receives doutput / (kernel_h * kernel_w) from every window
// that covers it (zero for cells no window covers), added in row-major order of the windows.
// Inverts `output = sum(window) / (kernel_h * kernel_w)`.
template <typename T>
void avg_pool2d_backward(T* dinput, const T* doutput, const Pool2dDims& dims);

}  // namespace cnnbp

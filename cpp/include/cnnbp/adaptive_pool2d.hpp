// cnnbp/adaptive_pool2d.hpp -- 2-D adaptive average pooling, forward and backward, with
// PyTorch's semantics (torch.nn.functional.adaptive_avg_pool2d).
//
// Dimension letters: N batch, C channels, H/W input, P/Q output. Dense C-contiguous NCHW.
// Outputs are overwritten. Output cell (p, q) of plane (n, c) averages the input cells of rows
// [adaptive_start(p, H, P), adaptive_end(p, H, P)) and columns [adaptive_start(q, W, Q),
// adaptive_end(q, W, Q)) (shapes.hpp: torch's floor(i * L / O), ceil((i + 1) * L / O)).
#pragma once

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// output[n,c,p,q] = (sum of window (p, q) of input plane (n,c)) / kh / kw, with kh x kw the
// window's rows and columns, summed in row-major order: torch's CPU kernel's arithmetic, so
// the same bits. The global pool (P = Q = 1) is a plain sum of the plane divided once by
// H * W (torch computes it as a mean), accumulated in double for both dtypes.
template <typename T>
void adaptive_avg_pool2d_forward(T* output, const T* input, const AdaptivePool2dDims& dims);

// dinput (N, C, H, W): each cell receives doutput / kh / kw from every window that covers it,
// added in row-major order of the windows (as torch). Inverts
// `output[p, q] = sum(window) / kh / kw`; the global pool's cells all receive
// doutput / (H * W) (inverting `output = sum(plane) / (H * W)`).
template <typename T>
void adaptive_avg_pool2d_backward(T* dinput, const T* doutput, const AdaptivePool2dDims& dims);

}  // namespace cnnbp

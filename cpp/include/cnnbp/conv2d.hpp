// cnnbp/conv2d.hpp -- 2-D convolution (cross-correlation, zero padding), forward and backward.
//
// Dimension letters: N batch, C in-channels, K out-channels, H/W input, P/Q output,
// R/S filter. All tensors are dense, C-contiguous, NCHW; weight is (K, C, R, S), PyTorch's
// layout. Get the dims from conv2d_dims() (shapes.hpp), which validates everything first.
// Outputs are overwritten, never accumulated into.
#pragma once

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// output[n,k,p,q] = bias[k] + sum_{c,r,s} weight[k,c,r,s] * input[n,c,p*sh-ph+r,q*sw-pw+s]
// (input cells outside the plane read as 0). bias may be nullptr.
template <typename T>
void conv2d_forward(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& dims);

// What conv2d_forward can apply to each output value z of filter k as it writes it, in
// place of passes of their own over the output: with center set, a batch normalization with
// fixed statistics, y = (z - center[k]) * scale[k] + shift[k] (batch_norm2d_eval_affine's
// constants: the same operations in the same order as batch_norm2d_forward, so the same
// bits); then, with relu, y <= 0 ? 0 : y (relu_forward's). Either part may be absent.
template <typename T>
struct Conv2dEpilogue {
    const T* center = nullptr;  // (K,) each, or all three nullptr
    const T* scale = nullptr;
    const T* shift = nullptr;
    bool relu = false;
};

// output = then(the forward above): the bits of conv2d_forward followed by the passes the
// epilogue stands for.
template <typename T>
void conv2d_forward(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& dims, const Conv2dEpilogue<T>& then);

// Gradients of the forward line above, given doutput (N, K, P, Q):
//   dinput  (N, C, H, W)  = full convolution of doutput with the 180-degree-rotated weight
//   dweight (K, C, R, S)  = valid cross-correlation of input with doutput
//   dbias   (K,)          = doutput summed over N, P, Q
// Any of dinput, dweight, dbias may be nullptr to skip that gradient.
template <typename T>
void conv2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const Conv2dDims& dims);

// Bytes of workspace the largest of forward, dinput and dweight allocates for these dims
// with `threads` threads (0 for the direct loops of tiny problems). It is bounded by a few
// images' worth per thread plus 8 partial dweights: it does not grow with the batch.
template <typename T>
int64_t conv2d_workspace_bytes(const Conv2dDims& dims, int64_t threads);

}  // namespace cnnbp

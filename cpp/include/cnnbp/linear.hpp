// cnnbp/linear.hpp -- fully connected layer, forward and backward.
//
// input (M, IN) where M is the product of the leading dims, weight (OUT, IN) (PyTorch's
// layout), bias (OUT,), output (M, OUT). Get the dims from linear_dims(). Outputs overwritten.
#pragma once

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// output = input . weight^T + bias     (bias may be nullptr)
template <typename T>
void linear_forward(T* output, const T* input, const T* weight, const T* bias,
                    const LinearDims& dims);

// Gradients of `output = input . weight^T + bias` given doutput (M, OUT):
//   dinput (M, IN) = doutput . weight      dweight (OUT, IN) = doutput^T . input
//   dbias (OUT,)   = doutput summed over M
// Any of dinput, dweight, dbias may be nullptr.
template <typename T>
void linear_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const LinearDims& dims);

}  // namespace cnnbp

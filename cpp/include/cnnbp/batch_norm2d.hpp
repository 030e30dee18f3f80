// cnnbp/batch_norm2d.hpp -- 2-D batch normalization, forward and backward, with PyTorch's
// semantics (torch.nn.functional.batch_norm on (N, C, H, W), torch.ops.aten.native_batch_norm
// and native_batch_norm_backward).
//
// Dimension letters: N batch, C channels, H/W height/width; M = N * H * W values per channel.
// Dense C-contiguous NCHW; weight, bias, running_mean, running_var, mean, invstd are (C,).
// Outputs are overwritten. Statistics are accumulated in double, one pass over the data per
// statistic, each channel by one thread in a fixed order: the same bits for any thread count
// and instruction set.
#pragma once

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// Training (params.training): per channel c over its M values,
//   mean[c] = sum(x) / M,  var[c] = sum((x - mean)^2) / M  (biased),
//   save_mean[c] = mean, save_invstd[c] = 1 / sqrt(var + eps),
//   y = (x - mean) * invstd * weight + bias,
// and, when running_mean / running_var are given, in place
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)  (unbiased).
// An empty batch (M = 0) writes no output, statistics mean 0 and invstd 1 / sqrt(eps) (the
// variance of nothing taken as 0), and leaves the running statistics as they are.
// Evaluation (!params.training): y = (x - running_mean) / sqrt(running_var + eps) * weight +
// bias; save_mean and save_invstd are not written (torch returns empty tensors).
// weight and bias may be nullptr (1 and 0: affine=False); running_mean and running_var may
// be nullptr in training (track_running_stats=False).
template <typename T>
void batch_norm2d_forward(T* output, T* save_mean, T* save_invstd, const T* input, const T* weight,
                          const T* bias, T* running_mean, T* running_var,
                          const BatchNorm2dDims& dims, const BatchNorm2dParams& params);

// Evaluation's forward as one affine map per channel: y = (x - center[c]) * scale[c] +
// shift[c] with center = running_mean, scale = weight / sqrt(running_var + eps) (rounded
// once, from double) and shift = bias (0 without); the values batch_norm2d_forward uses, so
// that another kernel can apply the same map (conv2d_forward's epilogue).
template <typename T>
void batch_norm2d_eval_affine(T* center, T* scale, T* shift, const T* weight, const T* bias,
                              const T* running_mean, const T* running_var, int64_t C, double eps);

// Inverts `y = (x - mean) * invstd * weight + bias` (weight nullptr: 1). With xhat =
// (x - mean) * invstd, per channel:
//   dbias = sum(dy),  dweight = sum(dy * xhat),
//   training (mean and invstd are the batch's, functions of x: save_mean, save_invstd)
//     dx = weight * invstd * (dy - dbias / M - xhat * dweight / M)
//   evaluation (mean = running_mean, invstd = 1 / sqrt(running_var + eps): constants)
//     dx = dy * weight * invstd.
// dweight and dbias may be nullptr (not wanted).
template <typename T>
void batch_norm2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                           const T* weight, const T* mean, const T* invstd,
                           const BatchNorm2dDims& dims, bool training);

}  // namespace cnnbp

// cnnbp/shapes.hpp -- the one place that validates shapes and parameters and computes
// output sizes. Every kernel entry point (Python bindings, C++ callers) goes through
// these functions before any kernel runs; they throw std::invalid_argument with a
// message "[op] what: expected ..., got ..." and never touch data.
//
// Dimension letters: N batch, C in-channels, K out-channels, H/W input height/width,
// P/Q output height/width, R/S filter height/width.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace cnnbp {

using Shape = std::vector<int64_t>;

// "(2, 3, 4)" -- how shapes appear in error messages.
std::string shape_str(const Shape& shape);
// the shortest text that reads back as `value` ("0.5", "1e-05", "2.0", "nan"), as Python's
// repr of a float
std::string number_str(double value);

// Number of elements of a shape (1 for a scalar shape ()). Throws std::invalid_argument
// ("[numel] shape: ...") for a negative dim or more than kMaxElements elements, so that no
// tensor sized by it (nn.hpp's Tensor, a model file's array) can wrap around.
int64_t numel(const Shape& shape);

// ---- size limits ---------------------------------------------------------------------------
// Checked before anything is allocated, so that no size a kernel computes (element counts,
// offsets, workspace bytes) can overflow int64: every tensor, padded extent and padded plane
// stack holds at most kMaxElements values (2 PiB of float64, beyond any machine), and one
// call does at most kMaxWork multiply-adds or window cells (days of a CPU's time). Within
// them the largest size computed, conv2d's workspace in bytes, stays below 2^62.
constexpr int64_t kMaxElements = int64_t(1) << 48;
constexpr int64_t kMaxWork = int64_t(1) << 56;

// The product of factors >= 0 when it is at most `limit`, else -1 (also for a negative
// factor). Exact and overflow-free whatever the factors; 0 when any factor is 0.
int64_t checked_product(std::initializer_list<int64_t> factors, int64_t limit);
// numel(shape), or throws "[op] name: expected at most 2^48 elements, got shape (...)".
int64_t checked_numel(const char* op, const char* name, const Shape& shape,
                      int64_t limit = kMaxElements);

// Output length of a sliding window along one axis, torch's rule: with the window's extent
// e = dilation * (kernel - 1) + 1,
//   floor((in + 2 * padding - e) / stride) + 1            (ceil_mode false)
//   ceil((in + 2 * padding - e) / stride) + 1             (ceil_mode true)
// and in ceil mode a last window that would start in the right padding is dropped
// (torch: if (out - 1) * stride >= in + padding then out -= 1).
// Shared by every kernel, layer and the NumPy oracle. Throws when in < 0, kernel < 1,
// stride < 1, padding < 0, dilation < 1 or in + 2 * padding > kMaxElements; the result may
// be < 1 (callers reject that with their own op-prefixed message).
int64_t output_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                    int64_t dilation = 1, bool ceil_mode = false);

// ---- conv2d ------------------------------------------------------------------------------
struct Conv2dParams {
    int64_t stride_h = 1, stride_w = 1;
    int64_t pad_h = 0, pad_w = 0;  // zeros on both sides of each axis (ignored when same_padding)
    int64_t dilation_h = 1, dilation_w = 1;  // filter taps dilation apart
    int64_t groups = 1;         // C and K split into groups; group g's filters read its channels
    bool same_padding = false;  // torch's padding='same' (stride 1): output size = input size
};

struct Conv2dDims {
    int64_t N, C, H, W;  // input (N, C, H, W)
    int64_t K, R, S;     // weight (K, C / groups, R, S)
    int64_t P, Q;        // output (N, K, P, Q)
    // As given, except that padding='same' is resolved: pad_h / pad_w are the top / left
    // padding, and pad_bottom / pad_right (below) the bottom / right one.
    Conv2dParams params;
    // torch's 'same': total dilation * (kernel - 1) per axis, top = total / 2, bottom the rest
    // (one more when the total is odd); equal to pad_h / pad_w otherwise.
    int64_t pad_bottom = 0, pad_right = 0;
    bool batched = true;  // false for an unbatched (C, H, W) input: N = 1, output (K, P, Q)
};

// input (N, C, H, W) or unbatched (C, H, W), weight (K, C / groups, R, S), bias (K,) or
// nullptr when there is none. N may be 0 (an empty batch: empty output, zero parameter
// gradients). stride, dilation and
// groups >= 1, padding >= 0, C and K multiples of groups, the dilated kernel
// dilation * (kernel - 1) + 1 no larger than the padded input, and same_padding only with
// stride 1 (torch's rules). `op` names the caller in messages (conv2d_backward validates the
// same way).
Conv2dDims conv2d_dims(const Shape& input, const Shape& weight, const Shape* bias,
                       const Conv2dParams& params, const char* op = "conv2d");
// The output's shape: (N, K, P, Q), or (K, P, Q) for an unbatched input.
Shape conv2d_output_shape(const Conv2dDims& dims);
// doutput must be the output's shape for the dims of the forward call.
void conv2d_check_doutput(const Conv2dDims& dims, const Shape& doutput);

// ---- pool2d ------------------------------------------------------------------------------
struct Pool2dParams {
    int64_t kernel_h, kernel_w;
    int64_t stride_h, stride_w;  // torch's default stride is the kernel size
    int64_t pad_h = 0, pad_w = 0;
    int64_t dilation_h = 1, dilation_w = 1;   // max_pool2d only: window taps dilation apart
    bool ceil_mode = false;                   // output size rounded up (see output_size)
    bool count_include_pad = true;            // avg_pool2d only: padding counts in the divisor
    std::optional<int64_t> divisor_override;  // avg_pool2d only: a nonzero divisor
};

// The window's params from (h, w) pairs, every option at its default.
inline Pool2dParams pool2d_window(std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
                                  std::array<int64_t, 2> padding) {
    Pool2dParams params{};
    params.kernel_h = kernel[0];
    params.kernel_w = kernel[1];
    params.stride_h = stride[0];
    params.stride_w = stride[1];
    params.pad_h = padding[0];
    params.pad_w = padding[1];
    return params;
}

struct Pool2dDims {
    int64_t N, C, H, W;  // input (N, C, H, W)
    int64_t P, Q;        // output (N, C, P, Q)
    Pool2dParams params;
    bool batched = true;  // false for an unbatched (C, H, W) input: N = 1, output (C, P, Q)
};

// The output's shape: (N, C, P, Q), or (C, P, Q) for an unbatched input.
Shape pool2d_output_shape(const Pool2dDims& dims);

// input (N, C, H, W) or unbatched (C, H, W); N may be 0 (an empty batch).
// `op` names the caller in messages ("max_pool2d"), `input_name` the input's shape in them
// ("x_shape" where a backward is given the shape rather than the array). Matches torch:
// padding at most half the kernel, output size by output_size (floored or ceil_mode).
// kernel_size >= 1, stride >= 1, dilation >= 1, 0 <= padding <= kernel_size / 2 (torch's
// rule, with the kernel size itself, not the dilated extent), divisor_override != 0, and
// the dilated extent dilation * (kernel_size - 1) + 1 at most kMaxElements.
void pool2d_check_params(const char* op, const Pool2dParams& params);

Pool2dDims pool2d_dims(const char* op, const Shape& input, const Pool2dParams& params,
                       const char* input_name = "input");

// max_pool2d_backward: doutput and indices (N, C, P, Q), x_shape (N, C, H, W) (or all three
// unbatched: (C, P, Q), (C, H, W)).
// Returns the dims (params unset) after checking shapes; the index values are checked
// separately by check_pool_indices because that reads data.
Pool2dDims max_pool2d_backward_dims(const Shape& doutput, const Shape& indices,
                                    const Shape& input_shape);
// Every index must lie inside its input plane [0, plane_size): a wrong index is an
// error, never an out-of-bounds write.
void check_pool_indices(const int64_t* indices, int64_t count, int64_t plane_size);

// avg_pool2d_backward: x_shape (N, C, H, W) and the forward's parameters, checked as the
// forward checks them; doutput must then be the forward output's shape (N, C, P, Q).
Pool2dDims avg_pool2d_backward_dims(const Shape& doutput, const Shape& input_shape,
                                    const Pool2dParams& params);

// ---- adaptive_avg_pool2d -------------------------------------------------------------------
// torch's output_size: per axis (h, w) a size >= 1, or nullopt (torch's None): the input's size
// along that axis.
using AdaptiveOutputSize = std::array<std::optional<int64_t>, 2>;

struct AdaptivePool2dDims {
    int64_t N, C, H, W;   // input (N, C, H, W)
    int64_t P, Q;         // output (N, C, P, Q)
    bool batched = true;  // false for an unbatched (C, H, W) input: N = 1, output (C, P, Q)
};

// The window of output cell o along an axis of input length `in` and output length `out`,
// torch's rule: input cells [adaptive_start, adaptive_end) = [floor(o * in / out),
// ceil((o + 1) * in / out)). Every window holds at least one cell; with out > in neighbouring
// windows share cells. adaptive_pool2d_dims keeps out * in within int64.
inline int64_t adaptive_start(int64_t o, int64_t in, int64_t out) { return o * in / out; }
inline int64_t adaptive_end(int64_t o, int64_t in, int64_t out) {
    return ((o + 1) * in + out - 1) / out;
}

// Each given size >= 1 ("[op] output_size: expected sizes >= 1 or None, got (0, 2)").
void adaptive_pool2d_check_output_size(const char* op, const AdaptiveOutputSize& output_size);

// input (N, C, H, W) or unbatched (C, H, W), N may be 0; output (P, Q) = output_size with
// None taken from (H, W). `input_name` names the input in messages ("x_shape" for the
// backward).
AdaptivePool2dDims adaptive_pool2d_dims(const char* op, const Shape& input,
                                        const AdaptiveOutputSize& output_size,
                                        const char* input_name = "input");
// The output's shape: (N, C, P, Q), or (C, P, Q) for an unbatched input.
Shape adaptive_pool2d_output_shape(const AdaptivePool2dDims& dims);
// adaptive_avg_pool2d_backward: x_shape and output_size checked as the forward checks them;
// doutput must then be the forward output's shape.
AdaptivePool2dDims adaptive_avg_pool2d_backward_dims(const Shape& doutput, const Shape& input_shape,
                                                     const AdaptiveOutputSize& output_size);

// ---- batch_norm2d --------------------------------------------------------------------------
// torch's batch_norm options, parsed once and shared by the forward and the backward.
struct BatchNorm2dParams {
    bool training = true;   // batch statistics (and the running stats updated), else running
    double momentum = 0.1;  // running = (1 - momentum) * running + momentum * batch, in [0, 1]
    double eps = 1e-5;      // added to the variance, > 0
};
// momentum in [0, 1] and eps a finite number > 0 (NaN refused): "[op] eps: expected a
// number > 0, got 0".
BatchNorm2dParams batch_norm2d_params(const char* op, bool training, double momentum, double eps);

struct BatchNorm2dDims {
    int64_t N, C, H, W;  // input (N, C, H, W); statistics over N * H * W values per channel
};
// input (N, C, H, W) (N may be 0, the other dims >= 1); weight, bias, running_mean and
// running_var (C,) or nullptr; running_mean and running_var given together. Training needs
// more than one value per channel (N * H * W > 1, or an empty batch), as torch; evaluation
// needs the running statistics.
BatchNorm2dDims batch_norm2d_dims(const char* op, const Shape& input, const Shape* weight,
                                  const Shape* bias, const Shape* running_mean,
                                  const Shape* running_var, const BatchNorm2dParams& params);
// batch_norm2d_backward: input (N, C, H, W), doutput its shape, weight (C,) or nullptr, mean
// and invstd (C,).
BatchNorm2dDims batch_norm2d_backward_dims(const Shape& doutput, const Shape& input,
                                           const Shape* weight, const Shape& mean,
                                           const Shape& invstd);

// ---- threads -------------------------------------------------------------------------------
// set_num_threads: n in [1, kMaxThreads]. More threads than any CPU has would not run
// faster, and OpenMP ends the process when it cannot start or allocate a team of them.
constexpr int64_t kMaxThreads = 1024;
void check_num_threads(int64_t n);

// ---- elementwise, linear, losses -----------------------------------------------------------
// Two tensors of an elementwise op must have the same shape.
void check_same_shape(const char* op, const char* name_a, const Shape& a, const char* name_b,
                      const Shape& b);

// ---- leaky_relu, gelu ----------------------------------------------------------------------
// leaky_relu's negative_slope: any finite number (a model file, JSON, has no inf or NaN).
double leaky_relu_slope(const char* op, double negative_slope);

// gelu's approximate, as torch: 'none' (the exact erf form) or 'tanh'.
enum class GeluApproximate { None, Tanh };
// "none" or "tanh"; anything else "[op] approximate: expected 'none' or 'tanh', got '...'".
GeluApproximate parse_gelu_approximate(const char* op, const std::string& text);
const char* gelu_approximate_str(GeluApproximate approximate);

// ---- softmax, log_softmax -------------------------------------------------------------------
// The input seen as (outer, K, inner) around the dim the softmax runs along: outer the
// product of the dims before it, K its size, inner the product of the dims after it.
struct SoftmaxDims {
    int64_t outer = 1, K = 1, inner = 1;
};
// torch's rule for dim: an int in [-ndim, ndim), a negative one counted from the end (a 0-d
// input counts as 1 dim: dim 0 or -1, K = 1). Any shape, empty ones included; otherwise
// "[op] dim: expected an int in [-2, 1] (input shape (2, 3)), got 2".
SoftmaxDims softmax_dims(const char* op, const Shape& input, int64_t dim);

// ---- dropout -------------------------------------------------------------------------------
struct DropoutParams {
    double p = 0.5;     // probability of dropping an element
    uint64_t seed = 0;  // the mask is a function of (seed, flat index) only
};
// p in [0, 1] (NaN refused), as torch. `op` names the caller ("dropout", "dropout_backward").
DropoutParams dropout_params(const char* op, double p, uint64_t seed = 0);

struct LinearDims {
    int64_t M;    // rows: the product of all leading dims of input (*, IN)
    int64_t IN;   // in_features
    int64_t OUT;  // out_features
};
// input (*, IN) with at least one dim, weight (OUT, IN), bias (OUT,) or nullptr.
LinearDims linear_dims(const Shape& input, const Shape& weight, const Shape* bias,
                       const char* op = "linear");
void linear_check_doutput(const LinearDims& dims, const Shape& input, const Shape& doutput);

// ---- losses --------------------------------------------------------------------------------
// torch's reduction: the per-element losses ('none'), their sum, or their mean (the
// default; cross-entropy's mean divides by the weights of the counted targets).
enum class Reduction { None, Mean, Sum };
// "mean", "sum" or "none"; anything else "[op] reduction: expected 'mean', 'sum' or 'none',
// got 'text'"
Reduction parse_reduction(const char* op, const std::string& text);
// the reduction's name, as parse_reduction reads it
const char* reduction_str(Reduction reduction);

// Binary cross-entropy (both forms): prediction and target of the same shape (empty allowed).
void check_bce_shapes(const char* op, const Shape& prediction, const Shape& target);
// torch refuses probabilities outside [0, 1] (NaN included) for binary_cross_entropy.
template <typename T>
void check_probabilities(const char* op, const T* a, int64_t count);
// A weight (or pos_weight) of the binary losses broadcasts to the input's shape, as torch's
// expand: at most as many dims, each trailing dim 1 or the input's.
void check_expandable(const char* op, const char* name, const Shape& weight, const Shape& input);
// dst (numel(shape) values) = src of shape src_shape broadcast to shape (check_expandable)
template <typename T>
void expand_to(T* dst, const Shape& shape, const T* src, const Shape& src_shape);

struct CrossEntropyParams {
    Reduction reduction = Reduction::Mean;
    int64_t ignore_index = -100;   // class-index targets equal to it count for nothing
    double label_smoothing = 0.0;  // in [0, 1]: targets mixed with the uniform 1 / K
};
// label_smoothing in [0, 1] (NaN refused), as torch.
CrossEntropyParams cross_entropy_params(const char* op, Reduction reduction, int64_t ignore_index,
                                        double label_smoothing);

struct CrossEntropyDims {
    int64_t N, K;                // logits (N, K, d1, ...), labels (N, d1, ...)
    int64_t S = 1;               // d1 * d2 * ...: the positions of each sample (1 without d's)
    bool probabilities = false;  // the target: class probabilities of logits' shape
};
// logits (N, K) or (N, K, d1, ...), N >= 0, or unbatched (K,) (as N = 1); labels (N,) /
// (N, d1, ...) / () of class indices, or (with probabilities) a target of logits' shape.
// `input_name` names the logits in messages (nll_loss's "input": log-probabilities).
CrossEntropyDims cross_entropy_dims(const char* op, const Shape& logits, const Shape& labels,
                                    bool probabilities = false, const char* input_name = "logits");
// torch refuses an ignore_index other than the default -100 with class probabilities.
void check_ignore_index(const char* op, const CrossEntropyDims& dims,
                        const CrossEntropyParams& params);
// weight: (K,), one per class
void check_class_weight(const char* op, const CrossEntropyDims& dims, const Shape& weight);
// Labels are class indices in [0, K), or ignore_index.
void check_labels(const char* op, const int64_t* labels, int64_t count, int64_t K,
                  int64_t ignore_index = -100);
// the shape of the per-position losses of reduction 'none': logits' without dim 1 (a scalar
// () for unbatched logits (K,))
Shape cross_entropy_loss_shape(const Shape& logits);

}  // namespace cnnbp

// Validation of shapes and parameters, and the output-size helper (see shapes.hpp).
#include "cnnbp/shapes.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "parallel.hpp"

namespace cnnbp {

std::string number_str(double value) {
    if (std::isnan(value)) return "nan";
    if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
    char text[32];
    for (int precision = 1; precision <= 17; ++precision) {
        std::snprintf(text, sizeof text, "%.*g", precision, value);
        if (std::strtod(text, nullptr) == value) break;
    }
    std::string out = text;
    if (out.find_first_of(".e") == std::string::npos) out += ".0";  // 0.0, as a float reads
    return out;
}

std::string shape_str(const Shape& shape) {
    std::ostringstream out;
    out << "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) out << ", ";
        out << shape[i];
    }
    if (shape.size() == 1) out << ",";
    out << ")";
    return out.str();
}

int64_t numel(const Shape& shape) { return checked_numel("numel", "shape", shape); }

namespace {

// a * b when it is at most `limit` (a, b >= 0, a <= limit), else -1; without overflow, and
// without a division where the compiler checks multiplications itself (these run on every
// layer call, where a 64-bit division costs more than a tiny layer's arithmetic)
inline int64_t times_at_most(int64_t a, int64_t b, int64_t limit) {
#if defined(__GNUC__) || defined(__clang__)
    int64_t product;
    if (__builtin_mul_overflow(a, b, &product) || product > limit) return -1;
    return product;
#else
    return a != 0 && b > limit / a ? -1 : a * b;
#endif
}

}  // namespace

int64_t checked_product(std::initializer_list<int64_t> factors, int64_t limit) {
    bool zero = false;
    for (int64_t f : factors) {
        if (f < 0) return -1;
        zero = zero || f == 0;
    }
    if (zero) return 0;
    int64_t product = 1;
    for (int64_t f : factors)
        if ((product = times_at_most(product, f, limit)) < 0) return -1;
    return product;
}

namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
    throw std::invalid_argument(std::string("[") + op + "] " + what);
}

void check_rank(const char* op, const char* name, const Shape& shape, size_t rank,
                const char* letters) {
    if (shape.size() != rank)
        fail(op, std::string(name) + ": expected " + std::to_string(rank) + " dims " + letters +
                     ", got shape " + shape_str(shape));
}

// Every dim of `shape` from `first` on >= 1 (first 1: all but the batch). Allocates only
// to fail: it runs on every layer call.
void check_nonempty(const char* op, const char* name, const Shape& shape, size_t first = 0) {
    for (size_t i = first; i < shape.size(); ++i)
        if (shape[i] < 1)
            fail(op, std::string(name) + ": expected every dim" + (first ? " but the batch" : "") +
                         " >= 1, got shape " + shape_str(shape));
}

// "input shape (1, 2, 3, 4)" or "x_shape (1, 2, 3, 4)": how the pools' messages name the
// input they were given (an array, or a backward's shape argument).
std::string named_shape(const char* input_name, const Shape& shape) {
    return std::string(input_name) + (std::string(input_name) == "input" ? " shape " : " ") +
           shape_str(shape);
}

// An output (N, C, P, Q) in the input's form: (C, P, Q) for an unbatched input.
Shape output_in_form(bool batched, int64_t N, int64_t C, int64_t P, int64_t Q) {
    if (batched) return {N, C, P, Q};
    return {C, P, Q};
}

// The (N, C, H, W) of a (C, H, W) or (N, C, H, W) shape, N = 1 for the unbatched form
// (torch's rule for 2-d convolution and pooling), after checking the rank and that every
// dim but the batch is >= 1.
struct BatchForm {
    int64_t N, C, H, W;
    bool batched;
};
BatchForm batch_form(const char* op, const char* name, const Shape& shape) {
    if (shape.size() != 3 && shape.size() != 4)
        fail(op, std::string(name) +
                     ": expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape " +
                     shape_str(shape));
    checked_numel(op, name, shape);  // no negative dim, no more than kMaxElements
    const bool batched = shape.size() == 4;
    check_nonempty(op, name, shape, batched ? 1 : 0);  // an empty batch is allowed (torch's)
    const size_t c = batched ? 1 : 0;
    return {batched ? shape[0] : 1, shape[c], shape[c + 1], shape[c + 2], batched};
}

// The shortest %g text that reads back as v ("1.5", "0.1", "-2", "nan", "inf"), so that a
// value in a message looks as the user wrote it.
std::string shortest_str(double v) {
    char text[40];
    for (int digits = 1; digits <= 17; ++digits) {
        std::snprintf(text, sizeof text, "%.*g", digits, v);
        if (std::isnan(v) || std::strtod(text, nullptr) == v) break;
    }
    return text;
}

void check_window(const char* op, const char* name, int64_t value, int64_t minimum) {
    if (value < minimum)
        fail(op, std::string(name) + ": expected >= " + std::to_string(minimum) + ", got " +
                     std::to_string(value));
}

// "2^48" for the powers of two the limits are, else the number.
std::string limit_str(int64_t limit) {
    for (int bit = 0; bit < 63; ++bit)
        if (limit == (int64_t(1) << bit)) return "2^" + std::to_string(bit);
    return std::to_string(limit);
}

// in + 2 * padding for in, padding >= 0, or throws when it exceeds kMaxElements.
int64_t padded_extent(const char* op, int64_t in, int64_t padding) {
    if (in > kMaxElements || padding > (kMaxElements - in) / 2)
        fail(op, "padding: expected a padded size (size + 2 * padding) of at most " +
                     limit_str(kMaxElements) + ", got " + std::to_string(in) + " + 2 * " +
                     std::to_string(padding));
    return in + 2 * padding;
}

}  // namespace

// The failure of checked_numel, out of its hot path.
[[noreturn]] [[gnu::cold]] [[gnu::noinline]] static void fail_numel(const char* op,
                                                                    const char* name,
                                                                    const Shape& shape,
                                                                    int64_t limit, bool negative) {
    if (negative)
        fail(op, std::string(name) + ": expected every dim >= 0, got shape " + shape_str(shape));
    fail(op, std::string(name) + ": expected at most " + limit_str(limit) +
                 " elements, got shape " + shape_str(shape));
}

int64_t checked_numel(const char* op, const char* name, const Shape& shape, int64_t limit) {
    bool negative = false, zero = false;
    for (int64_t d : shape) {
        negative = negative || d < 0;
        zero = zero || d == 0;
    }
    if (negative) fail_numel(op, name, shape, limit, true);
    if (zero) return 0;
    int64_t count = 1;
    for (int64_t d : shape)
        if ((count = times_at_most(count, d, limit)) < 0) fail_numel(op, name, shape, limit, false);
    return count;
}

int64_t output_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation,
                    bool ceil_mode) {
    check_window("output_size", "in_size", in, 0);
    check_window("output_size", "kernel", kernel, 1);
    check_window("output_size", "stride", stride, 1);
    check_window("output_size", "padding", padding, 0);
    check_window("output_size", "dilation", dilation, 1);
    // the window's extent dilation * (kernel - 1) + 1; one beyond any padded size (at most
    // kMaxElements) saturates, which keeps every sum below exact and overflow-free
    const int64_t taps = checked_product({dilation, kernel - 1}, kMaxElements);
    const int64_t extent = taps < 0 ? std::numeric_limits<int64_t>::max() : taps + 1;
    const int64_t padded = padded_extent("output_size", in, padding);
    // >= 1 - 2^63, and adding stride - 1 <= 2^63 - 2 keeps it below padded: no overflow
    const int64_t span = padded - extent + (ceil_mode ? stride - 1 : 0);
    // floor division, also for a negative span (window larger than the padded input)
    const int64_t steps = span >= 0 ? span / stride : -(-(span + 1) / stride) - 1;
    // ceil mode: the last window must start inside the input or the left padding (steps
    // * stride <= span here, so the product does not overflow)
    if (ceil_mode && steps >= 0 && steps * stride >= in + padding) return steps;
    return steps + 1;
}

// ---- threads -----------------------------------------------------------------------------

void check_num_threads(int64_t n) {
    check_window("set_num_threads", "n", n, 1);
    if (n > kMaxThreads)
        fail("set_num_threads",
             "n: expected <= " + std::to_string(kMaxThreads) + ", got " + std::to_string(n));
}

// ---- conv2d ------------------------------------------------------------------------------

namespace {

// dilation * (kernel - 1) + 1 for kernel, dilation >= 1, or throws beyond kMaxElements.
int64_t dilated_extent(const char* op, int64_t kernel, int64_t dilation) {
    const int64_t taps = checked_product({dilation, kernel - 1}, kMaxElements - 1);
    if (taps < 0)
        fail(op,
             "dilation: expected a dilated kernel size (dilation * (kernel_size - 1) + 1) of "
             "at most " +
                 limit_str(kMaxElements) + ", got " + std::to_string(dilation) + " * (" +
                 std::to_string(kernel) + " - 1) + 1");
    return taps + 1;
}

std::string pair_str(int64_t h, int64_t w) {
    return "(" + std::to_string(h) + ", " + std::to_string(w) + ")";
}

}  // namespace

Conv2dDims conv2d_dims(const Shape& given_input, const Shape& weight, const Shape* bias,
                       const Conv2dParams& params, const char* op) {
    const BatchForm input = batch_form(op, "input", given_input);
    check_rank(op, "weight", weight, 4, "(K, C / groups, R, S)");
    check_nonempty(op, "weight", weight);
    check_window(op, "stride", std::min(params.stride_h, params.stride_w), 1);
    if (!params.same_padding) check_window(op, "padding", std::min(params.pad_h, params.pad_w), 0);
    check_window(op, "dilation", std::min(params.dilation_h, params.dilation_w), 1);
    check_window(op, "groups", params.groups, 1);
    if (params.same_padding && (params.stride_h != 1 || params.stride_w != 1))
        fail(op, "padding: expected stride 1 with padding='same' (torch's rule), got stride " +
                     pair_str(params.stride_h, params.stride_w));
    const int64_t G = params.groups;
    Conv2dDims d{input.N, input.C, input.H, input.W, weight[0], weight[2], weight[3], 0, 0, params};
    if (d.C % G != 0)
        fail(op, "groups: expected a divisor of the input channels " + std::to_string(d.C) +
                     " (input " + shape_str(given_input) + "), got " + std::to_string(G));
    if (d.K % G != 0)
        fail(op, "weight: expected out channels (dim 0) divisible by groups " + std::to_string(G) +
                     ", got shape " + shape_str(weight));
    if (weight[1] != d.C / G)
        fail(op, "weight: expected " + std::to_string(d.C / G) +
                     " input channels (dim 1) to match input " + shape_str(given_input) +
                     (G > 1 ? " and groups " + std::to_string(G) : std::string()) + ", got shape " +
                     shape_str(weight));
    if (bias && (bias->size() != 1 || (*bias)[0] != d.K))
        fail(op,
             "bias: expected shape (" + std::to_string(d.K) + ",), got shape " + shape_str(*bias));
    checked_numel(op, "weight", weight);
    const int64_t extent_h = dilated_extent(op, d.R, params.dilation_h);
    const int64_t extent_w = dilated_extent(op, d.S, params.dilation_w);
    if (params.same_padding) {
        d.params.pad_h = (extent_h - 1) / 2;
        d.params.pad_w = (extent_w - 1) / 2;
        d.pad_bottom = extent_h - 1 - d.params.pad_h;
        d.pad_right = extent_w - 1 - d.params.pad_w;
    } else {
        d.pad_bottom = params.pad_h;
        d.pad_right = params.pad_w;
    }
    const auto& p = d.params;
    // the padded extents, each at most 2^48 + 2^49: no overflow
    const int64_t Hp = padded_extent(op, d.H, std::max(p.pad_h, d.pad_bottom));
    const int64_t Wp = padded_extent(op, d.W, std::max(p.pad_w, d.pad_right));
    if (d.H + p.pad_h + d.pad_bottom < extent_h || d.W + p.pad_w + d.pad_right < extent_w)
        fail(op, "input: expected padded size " +
                     pair_str(d.H + p.pad_h + d.pad_bottom, d.W + p.pad_w + d.pad_right) +
                     " >= " + (params.dilation_h > 1 || params.dilation_w > 1 ? "dilated " : "") +
                     "kernel size " + pair_str(extent_h, extent_w) + ", got input shape " +
                     shape_str(given_input));
    d.P = (d.H + p.pad_h + d.pad_bottom - extent_h) / p.stride_h + 1;
    d.Q = (d.W + p.pad_w + d.pad_right - extent_w) / p.stride_w + 1;
    if (checked_product({d.N, d.K, d.P, d.Q}, kMaxElements) < 0)
        fail(op, "output: expected at most " + limit_str(kMaxElements) + " elements, got shape " +
                     shape_str({d.N, d.K, d.P, d.Q}) + " from input " + shape_str(given_input) +
                     ", weight " + shape_str(weight) + ", stride " +
                     pair_str(p.stride_h, p.stride_w) + " and padding " +
                     pair_str(p.pad_h, p.pad_w));
    // The kernels' workspace: padded plane stacks of the input (forward, dweight) and of
    // doutput (dinput), a few images' worth per thread; the extents are <= Hp and Wp here.
    if (checked_product({d.N, std::max(d.C, d.K), Hp + extent_h, Wp + extent_w}, kMaxWork) < 0)
        fail(op, "padding: expected padded planes of at most " + limit_str(kMaxWork) +
                     " elements in all (N * max(C, K) * (H + 2 * pad_h + R) * (W + 2 * pad_w + "
                     "S)), got input shape " +
                     shape_str(given_input) + ", weight shape " + shape_str(weight) +
                     " and padding " + pair_str(p.pad_h, p.pad_w));
    if (checked_product({d.N, d.K, d.P, d.Q, d.C / G, d.R, d.S}, kMaxWork) < 0)
        fail(op, "input: expected at most " + limit_str(kMaxWork) +
                     " multiply-adds (N * K * P * Q * C / groups * R * S), got input shape " +
                     shape_str(given_input) + ", weight shape " + shape_str(weight) +
                     " and output size " + pair_str(d.P, d.Q));
    d.batched = input.batched;
    return d;
}

Shape conv2d_output_shape(const Conv2dDims& d) {
    return output_in_form(d.batched, d.N, d.K, d.P, d.Q);
}

void conv2d_check_doutput(const Conv2dDims& d, const Shape& doutput) {
    // compared in place: this runs on every backward, where allocating costs more than a
    // tiny layer's kernel
    if (d.batched && doutput.size() == 4 && doutput[0] == d.N && doutput[1] == d.K &&
        doutput[2] == d.P && doutput[3] == d.Q)
        return;
    const Shape expected = conv2d_output_shape(d);
    if (doutput != expected)
        fail("conv2d_backward", "doutput: expected shape " + shape_str(expected) +
                                    " (the forward output's), got shape " + shape_str(doutput));
}

// ---- pool2d ------------------------------------------------------------------------------

void pool2d_check_params(const char* op, const Pool2dParams& p) {
    check_window(op, "kernel_size", std::min(p.kernel_h, p.kernel_w), 1);
    check_window(op, "stride", std::min(p.stride_h, p.stride_w), 1);
    check_window(op, "padding", std::min(p.pad_h, p.pad_w), 0);
    check_window(op, "dilation", std::min(p.dilation_h, p.dilation_w), 1);
    if (p.pad_h > p.kernel_h / 2 || p.pad_w > p.kernel_w / 2)  // 2 * pad could overflow
        fail(op, "padding: expected at most half the kernel size (" + std::to_string(p.kernel_h) +
                     ", " + std::to_string(p.kernel_w) + "), got (" + std::to_string(p.pad_h) +
                     ", " + std::to_string(p.pad_w) + ")");
    // (a dilated kernel's extent; an undilated kernel larger than the input fails below)
    if ((p.dilation_h > 1 &&
         checked_product({p.dilation_h, p.kernel_h - 1}, kMaxElements - 1) < 0) ||
        (p.dilation_w > 1 && checked_product({p.dilation_w, p.kernel_w - 1}, kMaxElements - 1) < 0))
        fail(op,
             "dilation: expected a dilated kernel size (dilation * (kernel_size - 1) + 1) "
             "of at most " +
                 limit_str(kMaxElements) + ", got kernel_size (" + std::to_string(p.kernel_h) +
                 ", " + std::to_string(p.kernel_w) + ") and dilation (" +
                 std::to_string(p.dilation_h) + ", " + std::to_string(p.dilation_w) + ")");
    if (p.divisor_override && *p.divisor_override == 0)
        fail(op, "divisor_override: expected a nonzero int or None, got 0");
}

// Every window must have a tap inside the input: with dilation, one that starts in the left
// padding can step over a short input altogether (taps -1 and 3 of a 3-row input), where
// torch reports -inf at an index outside the plane. Windows starting at h >= 0 start inside
// the input (output_size keeps every start below in + padding); one starting at h < 0 first
// meets the input at h + ceil(-h / dilation) * dilation, which must be < in (its tap number
// ceil(-h / dilation) <= padding <= kernel / 2 is always a tap of the window).
static void check_windows_reach_input(const char* op, const char* input_name, const Shape& input,
                                      const char* axis, int64_t in, int64_t out, int64_t kernel,
                                      int64_t stride, int64_t pad, int64_t dilation) {
    if (dilation <= in) return;  // the first tap at or after 0 lies below dilation <= in
    for (int64_t o = 0; o < out && o < (pad + stride - 1) / stride; ++o) {
        const int64_t start = o * stride - pad;  // < 0
        const int64_t first = start + (-start + dilation - 1) / dilation * dilation;
        if (first >= in)
            fail(op, std::string(input_name) +
                         ": expected every window to have a cell inside the " +
                         "input, got the window of output " + axis + " " + std::to_string(o) +
                         " with taps " + std::to_string(start) + ", " +
                         std::to_string(start + dilation) + ", ... (kernel_size " +
                         std::to_string(kernel) + ", dilation " + std::to_string(dilation) +
                         ", padding " + std::to_string(pad) + ") missing its " +
                         std::to_string(in) + " " + axis + "s, " + named_shape(input_name, input));
    }
}

Pool2dDims pool2d_dims(const char* op, const Shape& given_input, const Pool2dParams& p,
                       const char* input_name) {
    const BatchForm input = batch_form(op, input_name, given_input);
    pool2d_check_params(op, p);
    Pool2dDims d{input.N, input.C, input.H, input.W, 0, 0, p};
    const int64_t Hp = padded_extent(op, d.H, p.pad_h);
    const int64_t Wp = padded_extent(op, d.W, p.pad_w);
    d.P = output_size(d.H, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h, p.ceil_mode);
    d.Q = output_size(d.W, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w, p.ceil_mode);
    if (d.P < 1 || d.Q < 1) {
        // the dilated extent (at most kMaxElements by pool2d_check_params); ceil mode also
        // fits a window that hangs up to stride - 1 cells past the padding
        const bool dilated = p.dilation_h != 1 || p.dilation_w != 1;
        const int64_t eh = p.dilation_h * (p.kernel_h - 1) + 1,
                      ew = p.dilation_w * (p.kernel_w - 1) + 1;
        fail(op, std::string(input_name) + ": expected padded size (" + std::to_string(Hp) + ", " +
                     std::to_string(Wp) + ")" +
                     (p.ceil_mode ? " + stride - 1 (" + std::to_string(Hp + p.stride_h - 1) + ", " +
                                        std::to_string(Wp + p.stride_w - 1) + ")"
                                  : std::string()) +
                     " >= " + (dilated ? "dilated " : "") + "kernel size (" + std::to_string(eh) +
                     ", " + std::to_string(ew) + "), got " + named_shape(input_name, given_input));
    }
    check_windows_reach_input(op, input_name, given_input, "row", d.H, d.P, p.kernel_h, p.stride_h,
                              p.pad_h, p.dilation_h);
    check_windows_reach_input(op, input_name, given_input, "column", d.W, d.Q, p.kernel_w,
                              p.stride_w, p.pad_w, p.dilation_w);
    if (checked_product({d.N, d.C, d.P, d.Q}, kMaxElements) < 0)
        fail(op, "output: expected at most " + limit_str(kMaxElements) + " elements, got shape " +
                     shape_str({d.N, d.C, d.P, d.Q}) + " from " + input_name + " " +
                     shape_str(given_input) + ", kernel_size (" + std::to_string(p.kernel_h) +
                     ", " + std::to_string(p.kernel_w) + "), stride (" +
                     std::to_string(p.stride_h) + ", " + std::to_string(p.stride_w) +
                     ") and padding (" + std::to_string(p.pad_h) + ", " + std::to_string(p.pad_w) +
                     ")");
    // kernel <= padded size here, so kernel_h * kernel_w <= Hp * Wp
    if (checked_product({d.N, d.C, d.P, d.Q, p.kernel_h, p.kernel_w}, kMaxWork) < 0)
        fail(op, "kernel_size: expected at most " + limit_str(kMaxWork) +
                     " window cells in all (N * C * P * Q * kernel_h * kernel_w), got " +
                     input_name + " " + shape_str(given_input) + ", kernel_size (" +
                     std::to_string(p.kernel_h) + ", " + std::to_string(p.kernel_w) +
                     ") and output size (" + std::to_string(d.P) + ", " + std::to_string(d.Q) +
                     ")");
    d.batched = input.batched;
    return d;
}

Shape pool2d_output_shape(const Pool2dDims& d) {
    return output_in_form(d.batched, d.N, d.C, d.P, d.Q);
}

Pool2dDims max_pool2d_backward_dims(const Shape& doutput, const Shape& indices,
                                    const Shape& input_shape) {
    const char* op = "max_pool2d_backward";
    const BatchForm x = batch_form(op, "x_shape", input_shape);
    const bool batched = x.batched;
    if (doutput.size() != input_shape.size())
        fail(op, "doutput: expected " + std::to_string(input_shape.size()) + " dims " +
                     (batched ? "(N, C, P, Q)" : "(C, P, Q)") + " as x_shape " +
                     shape_str(input_shape) + ", got shape " + shape_str(doutput));
    checked_numel(op, "doutput", doutput);
    if (indices != doutput)
        fail(op, "indices: expected shape " + shape_str(doutput) + " (doutput's), got shape " +
                     shape_str(indices));
    const size_t c = batched ? 1 : 0;  // doutput's channel dim
    if ((batched && doutput[0] != x.N) || doutput[c] != x.C)
        fail(op, (batched ? "doutput: expected (N, C) = (" + std::to_string(x.N) + ", "
                          : std::string("doutput: expected C = (")) +
                     std::to_string(x.C) + ") to match x_shape " + shape_str(input_shape) +
                     ", got shape " + shape_str(doutput));
    Pool2dDims d{x.N, x.C, x.H, x.W, doutput[c + 1], doutput[c + 2], Pool2dParams{}};
    d.batched = batched;
    return d;
}

void check_pool_indices(const int64_t* indices, int64_t count, int64_t plane_size) {
    // The check reads as many bytes as the backward itself: one branch-free pass that the
    // compiler vectorizes and the threads share, then the search for the first bad index
    // only when there is one, to name it. With u = index as unsigned and last = size - 1,
    // u | (last - u) has its top bit set exactly when index < 0 or index > last (64-bit
    // subtract and or vectorize on every x86-64, 64-bit compares do not).
    const uint64_t last = static_cast<uint64_t>(plane_size) - 1;
    std::atomic<uint64_t> bits{0};
    detail::parallel_for(count, count, [&](int64_t begin, int64_t end) {
        // four independent accumulators: the loop runs at the memory's pace rather than one
        // `or` chain's (which also made its speed depend on where the linker put it)
        uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
        int64_t i = begin;
        for (; i + 4 <= end; i += 4) {
            const uint64_t u0 = static_cast<uint64_t>(indices[i]),
                           u1 = static_cast<uint64_t>(indices[i + 1]),
                           u2 = static_cast<uint64_t>(indices[i + 2]),
                           u3 = static_cast<uint64_t>(indices[i + 3]);
            c0 |= u0 | (last - u0);
            c1 |= u1 | (last - u1);
            c2 |= u2 | (last - u2);
            c3 |= u3 | (last - u3);
        }
        for (; i < end; ++i) {
            const uint64_t u = static_cast<uint64_t>(indices[i]);
            c0 |= u | (last - u);
        }
        bits.fetch_or(c0 | c1 | c2 | c3, std::memory_order_relaxed);
    });
    const bool bad = bits.load() >> 63;
    if (!bad) return;
    for (int64_t i = 0; i < count; ++i)
        if (indices[i] < 0 || indices[i] >= plane_size)
            fail("max_pool2d_backward",
                 "indices: expected values in [0, " + std::to_string(plane_size) +
                     ") (flat positions in an H*W input plane), got " + std::to_string(indices[i]) +
                     " at flat position " + std::to_string(i));
}

Pool2dDims avg_pool2d_backward_dims(const Shape& doutput, const Shape& input_shape,
                                    const Pool2dParams& params) {
    const char* op = "avg_pool2d_backward";
    const Pool2dDims d = pool2d_dims(op, input_shape, params, "x_shape");
    const Shape expected = pool2d_output_shape(d);
    if (doutput != expected)
        fail(op, "doutput: expected shape " + shape_str(expected) +
                     " (the forward output's), got shape " + shape_str(doutput));
    return d;
}

// ---- adaptive_avg_pool2d -------------------------------------------------------------------

namespace {

std::string output_size_str(const AdaptiveOutputSize& s) {
    auto one = [](const std::optional<int64_t>& v) { return v ? std::to_string(*v) : "None"; };
    return "(" + one(s[0]) + ", " + one(s[1]) + ")";
}

}  // namespace

void adaptive_pool2d_check_output_size(const char* op, const AdaptiveOutputSize& output_size) {
    for (const auto& v : output_size)
        if (v && *v < 1)
            fail(op,
                 "output_size: expected sizes >= 1 or None, got " + output_size_str(output_size));
}

AdaptivePool2dDims adaptive_pool2d_dims(const char* op, const Shape& given_input,
                                        const AdaptiveOutputSize& output_size,
                                        const char* input_name) {
    const BatchForm input = batch_form(op, input_name, given_input);
    adaptive_pool2d_check_output_size(op, output_size);
    AdaptivePool2dDims d{input.N,
                         input.C,
                         input.H,
                         input.W,
                         output_size[0].value_or(input.H),
                         output_size[1].value_or(input.W),
                         input.batched};
    // the input as the messages name it, built only to fail: this runs on every layer call
    const auto given = [&] { return named_shape(input_name, given_input); };
    // the window bounds compute o * in for o <= out: out * in must fit in int64
    const int64_t limit = int64_t(1) << 62;
    if (checked_product({d.P, d.H}, limit) < 0 || checked_product({d.Q, d.W}, limit) < 0)
        fail(op, "output_size: expected output size * input size at most " + limit_str(limit) +
                     " along each axis, got output_size " + output_size_str(output_size) + " for " +
                     given());
    if (checked_product({d.N, d.C, d.P, d.Q}, kMaxElements) < 0)
        fail(op, "output: expected at most " + limit_str(kMaxElements) + " elements, got shape " +
                     shape_str({d.N, d.C, d.P, d.Q}) + " from " + given() + " and output_size " +
                     output_size_str(output_size));
    // the windows of an axis hold at most in + 2 * out cells in all (neighbours share at most
    // one cell when out <= in, windows hold one or two cells when out > in)
    if (checked_product({d.N, d.C, d.H + 2 * d.P, d.W + 2 * d.Q}, kMaxWork) < 0)
        fail(op, "output_size: expected at most " + limit_str(kMaxWork) +
                     " window cells in all, got " + given() + " and output_size " +
                     output_size_str(output_size));
    return d;
}

Shape adaptive_pool2d_output_shape(const AdaptivePool2dDims& d) {
    return output_in_form(d.batched, d.N, d.C, d.P, d.Q);
}

AdaptivePool2dDims adaptive_avg_pool2d_backward_dims(const Shape& doutput, const Shape& input_shape,
                                                     const AdaptiveOutputSize& output_size) {
    const char* op = "adaptive_avg_pool2d_backward";
    const AdaptivePool2dDims d = adaptive_pool2d_dims(op, input_shape, output_size, "x_shape");
    const Shape expected = adaptive_pool2d_output_shape(d);
    if (doutput != expected)
        fail(op, "doutput: expected shape " + shape_str(expected) +
                     " (the forward output's), got shape " + shape_str(doutput));
    return d;
}

// ---- batch_norm2d --------------------------------------------------------------------------

BatchNorm2dParams batch_norm2d_params(const char* op, bool training, double momentum, double eps) {
    if (!(momentum >= 0.0 && momentum <= 1.0))  // written so that NaN fails too
        fail(op, "momentum: expected a number in [0, 1], got " + shortest_str(momentum));
    if (!(eps > 0.0 && std::isfinite(eps)))
        fail(op, "eps: expected a finite number > 0, got " + shortest_str(eps));
    return BatchNorm2dParams{training, momentum, eps};
}

namespace {

// A per-channel vector (weight, bias, running stats, mean, invstd): shape (C,).
void check_channel_vector(const char* op, const char* name, const Shape* shape, int64_t C) {
    if (shape && (shape->size() != 1 || (*shape)[0] != C))
        fail(op, std::string(name) + ": expected shape (" + std::to_string(C) +
                     ",) (one value per channel), got shape " + shape_str(*shape));
}

BatchNorm2dDims batch_norm2d_input(const char* op, const Shape& input) {
    check_rank(op, "input", input, 4, "(N, C, H, W)");
    checked_numel(op, "input", input);
    check_nonempty(op, "input", input, 1);  // an empty batch is allowed (torch's)
    return {input[0], input[1], input[2], input[3]};
}

}  // namespace

BatchNorm2dDims batch_norm2d_dims(const char* op, const Shape& input, const Shape* weight,
                                  const Shape* bias, const Shape* running_mean,
                                  const Shape* running_var, const BatchNorm2dParams& params) {
    const BatchNorm2dDims d = batch_norm2d_input(op, input);
    check_channel_vector(op, "weight", weight, d.C);
    check_channel_vector(op, "bias", bias, d.C);
    check_channel_vector(op, "running_mean", running_mean, d.C);
    check_channel_vector(op, "running_var", running_var, d.C);
    if (!running_mean != !running_var)
        fail(op, std::string(running_mean ? "running_var" : "running_mean") +
                     ": expected an array with " + (running_mean ? "running_mean" : "running_var") +
                     ", got None");
    if (!params.training && !running_mean)
        fail(op,
             "running_mean: expected the running statistics in evaluation mode "
             "(training=False), got None");
    if (params.training && d.N * d.H * d.W == 1)
        fail(op, "input: expected more than 1 value per channel when training, got shape " +
                     shape_str(input));
    return d;
}

BatchNorm2dDims batch_norm2d_backward_dims(const Shape& doutput, const Shape& input,
                                           const Shape* weight, const Shape& mean,
                                           const Shape& invstd) {
    const char* op = "batch_norm2d_backward";
    const BatchNorm2dDims d = batch_norm2d_input(op, input);
    check_same_shape(op, "input", input, "doutput", doutput);
    check_channel_vector(op, "weight", weight, d.C);
    check_channel_vector(op, "mean", &mean, d.C);
    check_channel_vector(op, "invstd", &invstd, d.C);
    return d;
}

// ---- leaky_relu, gelu ----------------------------------------------------------------------

double leaky_relu_slope(const char* op, double negative_slope) {
    if (!std::isfinite(negative_slope))
        fail(op, "negative_slope: expected a finite float, got " + shortest_str(negative_slope));
    return negative_slope;
}

GeluApproximate parse_gelu_approximate(const char* op, const std::string& text) {
    if (text == "none") return GeluApproximate::None;
    if (text == "tanh") return GeluApproximate::Tanh;
    fail(op, "approximate: expected 'none' or 'tanh', got '" + text + "'");
}

const char* gelu_approximate_str(GeluApproximate approximate) {
    return approximate == GeluApproximate::Tanh ? "tanh" : "none";
}

// ---- softmax, log_softmax -------------------------------------------------------------------

SoftmaxDims softmax_dims(const char* op, const Shape& input, int64_t dim) {
    const int64_t rank = std::max<int64_t>(int64_t(input.size()), 1);  // 0-d: as 1 dim
    if (dim < -rank || dim >= rank)
        fail(op, "dim: expected an int in [" + std::to_string(-rank) + ", " +
                     std::to_string(rank - 1) + "] (input shape " + shape_str(input) + "), got " +
                     std::to_string(dim));
    const int64_t count = checked_numel(op, "input", input);
    SoftmaxDims d;
    if (input.empty()) return d;
    const size_t axis = size_t(dim < 0 ? dim + rank : dim);
    d.K = input[axis];
    if (count == 0) return {0, d.K, 0};  // nothing to compute (and no product to overflow)
    for (size_t i = 0; i < input.size(); ++i) {
        if (i < axis) d.outer *= input[i];
        if (i > axis) d.inner *= input[i];
    }
    return d;
}

// ---- dropout -------------------------------------------------------------------------------

DropoutParams dropout_params(const char* op, double p, uint64_t seed) {
    if (!(p >= 0.0 && p <= 1.0))  // written so that NaN fails too
        fail(op, "p: expected a probability in [0, 1], got " + shortest_str(p));
    return DropoutParams{p, seed};
}

// ---- elementwise, linear, losses -----------------------------------------------------------

void check_same_shape(const char* op, const char* name_a, const Shape& a, const char* name_b,
                      const Shape& b) {
    if (a != b)
        fail(op, std::string(name_b) + ": expected shape " + shape_str(a) + " (" + name_a +
                     "'s), got shape " + shape_str(b));
}

LinearDims linear_dims(const Shape& input, const Shape& weight, const Shape* bias, const char* op) {
    if (input.empty())
        fail(op, "input: expected at least 1 dim (*, in_features), got shape " + shape_str(input));
    check_rank(op, "weight", weight, 2, "(out_features, in_features)");
    check_nonempty(op, "weight", weight);
    checked_numel(op, "weight", weight);
    LinearDims d{1, input.back(), weight[0]};
    // rows: the leading dims' product, 0 when one is 0 (else it fits, as input's numel did)
    if (checked_numel(op, "input", input) == 0) d.M = 0;
    for (size_t i = 0; d.M && i + 1 < input.size(); ++i) d.M *= input[i];
    if (weight[1] != d.IN)
        fail(op, "weight: expected in_features (dim 1) = " + std::to_string(d.IN) +
                     " to match input " + shape_str(input) + ", got shape " + shape_str(weight));
    if (bias && (bias->size() != 1 || (*bias)[0] != d.OUT))
        fail(op, "bias: expected shape (" + std::to_string(d.OUT) + ",), got shape " +
                     shape_str(*bias));
    if (checked_product({d.M, d.OUT}, kMaxElements) < 0) {
        Shape output = input;
        output.back() = d.OUT;
        fail(op, "output: expected at most " + limit_str(kMaxElements) + " elements, got shape " +
                     shape_str(output) + " from input " + shape_str(input) + " and weight " +
                     shape_str(weight));
    }
    if (checked_product({d.M, d.OUT, d.IN}, kMaxWork) < 0)
        fail(op, "input: expected at most " + limit_str(kMaxWork) +
                     " multiply-adds (rows * out_features * in_features), got input shape " +
                     shape_str(input) + " and weight shape " + shape_str(weight));
    return d;
}

void linear_check_doutput(const LinearDims& d, const Shape& input, const Shape& doutput) {
    // compared in place first, as conv2d_check_doutput
    if (!input.empty() && doutput.size() == input.size() && doutput.back() == d.OUT &&
        std::equal(input.begin(), input.end() - 1, doutput.begin()))
        return;
    Shape expected = input;
    if (!expected.empty()) expected.back() = d.OUT;
    if (doutput != expected)
        fail("linear_backward", "doutput: expected shape " + shape_str(expected) +
                                    " (the forward output's), got shape " + shape_str(doutput));
}

void check_bce_shapes(const char* op, const Shape& prediction, const Shape& target) {
    check_same_shape(op, "input", prediction, "target", target);
    checked_numel(op, "input", prediction);  // may be empty: a mean of nothing is NaN (torch's)
}

template <typename T>
void check_probabilities(const char* op, const T* a, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
        if (!(a[i] >= T(0) && a[i] <= T(1)))  // written so that NaN fails too
            fail(op, "input: expected probabilities in [0, 1], got " + std::to_string(a[i]) +
                         " at flat position " + std::to_string(i));
}
template void check_probabilities<float>(const char*, const float*, int64_t);
template void check_probabilities<double>(const char*, const double*, int64_t);

Reduction parse_reduction(const char* op, const std::string& text) {
    if (text == "mean") return Reduction::Mean;
    if (text == "sum") return Reduction::Sum;
    if (text == "none") return Reduction::None;
    fail(op, "reduction: expected 'mean', 'sum' or 'none', got '" + text + "'");
}

const char* reduction_str(Reduction reduction) {
    switch (reduction) {
        case Reduction::None:
            return "none";
        case Reduction::Sum:
            return "sum";
        default:
            return "mean";
    }
}

void check_expandable(const char* op, const char* name, const Shape& weight, const Shape& input) {
    bool ok = weight.size() <= input.size();
    for (size_t i = 0; ok && i < weight.size(); ++i) {
        const int64_t w = weight[weight.size() - 1 - i], x = input[input.size() - 1 - i];
        ok = w == 1 || w == x;
    }
    if (!ok)
        fail(op, std::string(name) + ": expected a shape that broadcasts to " + shape_str(input) +
                     " (input's), got shape " + shape_str(weight));
}

template <typename T>
void expand_to(T* dst, const Shape& shape, const T* src, const Shape& src_shape) {
    // strides of src seen with shape's rank: 0 along a broadcast (size-1 or missing) dim
    const size_t rank = shape.size(), lead = rank - src_shape.size();
    std::vector<int64_t> stride(rank, 0);
    int64_t step = 1;
    for (size_t i = rank; i-- > lead;) {
        const int64_t d = src_shape[i - lead];
        stride[i] = d == 1 ? 0 : step;
        step *= d;
    }
    const int64_t count = numel(shape);
    std::vector<int64_t> index(rank, 0);
    int64_t offset = 0;
    for (int64_t i = 0; i < count; ++i) {
        dst[i] = src[offset];
        for (size_t k = rank; k-- > 0;) {  // the next index, row-major
            offset += stride[k];
            if (++index[k] < shape[k]) break;
            offset -= stride[k] * index[k];
            index[k] = 0;
        }
    }
}
template void expand_to<float>(float*, const Shape&, const float*, const Shape&);
template void expand_to<double>(double*, const Shape&, const double*, const Shape&);

CrossEntropyParams cross_entropy_params(const char* op, Reduction reduction, int64_t ignore_index,
                                        double label_smoothing) {
    if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))  // written so that NaN fails too
        fail(op,
             "label_smoothing: expected a number in [0, 1], got " + number_str(label_smoothing));
    return CrossEntropyParams{reduction, ignore_index, label_smoothing};
}

CrossEntropyDims cross_entropy_dims(const char* op, const Shape& logits, const Shape& labels,
                                    bool probabilities, const char* input_name) {
    const std::string input = input_name;
    const std::string inputs = input + (input.back() == 's' ? "'" : "'s");  // logits', input's
    if (logits.empty())
        fail(op, input +
                     ": expected 1 dim (K,) (unbatched), 2 dims (N, K) or more (N, K, d1, ...), "
                     "got shape ()");
    // unbatched logits (K,) are one row of (1, K); an empty batch (N = 0) is allowed
    const bool unbatched = logits.size() == 1;
    checked_numel(op, input_name, logits);
    check_nonempty(op, input_name, logits, unbatched ? 0 : 1);
    CrossEntropyDims d{unbatched ? 1 : logits[0], logits[unbatched ? 0 : 1], 1, probabilities};
    for (size_t i = 2; i < logits.size(); ++i) d.S *= logits[i];
    if (probabilities) {
        if (labels != logits)
            fail(op, "target: expected shape " + shape_str(logits) + " (" + inputs +
                         ", class probabilities), got shape " + shape_str(labels));
        return d;
    }
    const Shape expected = cross_entropy_loss_shape(logits);
    if (labels != expected) {
        if (logits.size() == 1)
            fail(op, "labels: expected shape () (one class index for unbatched " + input + " " +
                         shape_str(logits) + "), got shape " + shape_str(labels));
        if (logits.size() == 2)
            fail(op, "labels: expected shape (" + std::to_string(logits[0]) +
                         ",) (one class index per row of " + input + "), got shape " +
                         shape_str(labels));
        fail(op, "labels: expected shape " + shape_str(expected) + " (" + inputs +
                     " without the class dim), got shape " + shape_str(labels));
    }
    return d;
}

void check_ignore_index(const char* op, const CrossEntropyDims& dims,
                        const CrossEntropyParams& params) {
    if (dims.probabilities && params.ignore_index != -100)
        fail(op, "ignore_index: expected -100 (none) with class probabilities as the target, got " +
                     std::to_string(params.ignore_index));
}

void check_class_weight(const char* op, const CrossEntropyDims& dims, const Shape& weight) {
    if (weight.size() != 1 || weight[0] != dims.K)
        fail(op, "weight: expected shape (" + std::to_string(dims.K) +
                     ",) (one weight per class), got shape " + shape_str(weight));
}

void check_labels(const char* op, const int64_t* labels, int64_t count, int64_t K,
                  int64_t ignore_index) {
    for (int64_t n = 0; n < count; ++n)
        if ((labels[n] < 0 || labels[n] >= K) && labels[n] != ignore_index)
            fail(op, "labels: expected class indices in [0, " + std::to_string(K) + "), got " +
                         std::to_string(labels[n]) + " at position " + std::to_string(n));
}

Shape cross_entropy_loss_shape(const Shape& logits) {
    Shape shape = logits;
    if (shape.size() >= 2) shape.erase(shape.begin() + 1);
    if (shape.size() == 1 && logits.size() == 1) shape.clear();  // unbatched (K,): a scalar
    return shape;
}

}  // namespace cnnbp

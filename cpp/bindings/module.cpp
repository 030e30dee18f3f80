// cnnbp._core -- the thin Python layer over the C++ kernels.
//
// Each function: check dtypes (TypeError) and make inputs C-contiguous, parse parameters
// into the op's struct, validate through shapes.hpp (std::invalid_argument -> ValueError),
// allocate the outputs, then run the kernel with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "arrays.hpp"
#include "cnnbp/cnnbp.hpp"

namespace py = pybind11;
using cnnbp::Shape;

using namespace cnnbp_bindings;

namespace {

// A kernel call from Python: the GIL released while it runs, and the kernels' pool threads
// kept awake between its parallel loops (a conv backward's dinput, then dweight).
struct KernelCall {
    py::gil_scoped_release release;
    cnnbp::detail::Busy busy;
};

// An optional bias argument (conv2d, linear). A default-constructed py::array is a 0-d
// array, not "none", so presence is tracked apart.
struct OptionalBias {
    bool present;
    py::array array;
    Shape shape;

    OptionalBias(const char* op, const py::handle& obj, DType dtype) : present(!obj.is_none()) {
        if (!present) return;
        array = as_array(op, "bias", obj);
        check_dtype(op, "bias", array, dtype);
        shape = shape_of(array);
    }
    const Shape* shape_or_null() const { return present ? &shape : nullptr; }
};

// The passes of a layer with a weight (conv2d, linear), after the op's own checks.
// forward: y (y_shape) = run(y, x, w, b or null); backward: run(dx, dw, db, dy, x, w), with
// db of bias_size. `run` gets typed pointers and runs with the GIL released.
template <typename Run>
py::array weighted_forward(DType dtype, const py::array& x, const py::array& w,
                           const OptionalBias& bias, const Shape& y_shape, Run run) {
    return dispatch(dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto xc = contiguous<T>(x), wc = contiguous<T>(w);
        py::array_t<T, py::array::c_style> bc;
        if (bias.present) bc = contiguous<T>(bias.array);
        auto y = empty_like_shape<T>(y_shape);
        T* y_ptr = y.mutable_data();
        const T* b_ptr = bias.present ? bc.data() : nullptr;
        {  // the GIL is held again before the result is touched
            KernelCall call;
            run(y_ptr, xc.data(), wc.data(), b_ptr);
        }
        return y;
    });
}

template <typename Run>
py::tuple weighted_backward(DType dtype, const py::array& dy, const py::array& x,
                            const py::array& w, int64_t bias_size, Run run) {
    return dispatch(dtype, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        auto dyc = contiguous<T>(dy), xc = contiguous<T>(x), wc = contiguous<T>(w);
        auto dx = empty_like_shape<T>(shape_of(x)), dw = empty_like_shape<T>(shape_of(w));
        auto db = empty_like_shape<T>({bias_size});
        T *dx_ptr = dx.mutable_data(), *dw_ptr = dw.mutable_data(), *db_ptr = db.mutable_data();
        {
            KernelCall call;
            run(dx_ptr, dw_ptr, db_ptr, dyc.data(), xc.data(), wc.data());
        }
        return py::make_tuple(dx, dw, db);
    });
}

// A kernel from one array to one new array (the pools without indices, their backwards):
// out (out_shape) = run(out, in) with typed pointers, run with the GIL released.
template <typename Run>
py::array one_array_kernel(DType dtype, const py::array& in, const Shape& out_shape, Run run) {
    return dispatch(dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto inc = contiguous<T>(in);
        auto out = empty_like_shape<T>(out_shape);
        T* out_ptr = out.mutable_data();
        {  // the GIL is held again before the result is touched
            KernelCall call;
            run(out_ptr, inc.data());
        }
        return out;
    });
}

// ---- conv2d ------------------------------------------------------------------------------

// torch's conv2d arguments: stride and dilation an int or a pair, padding that or 'same' /
// 'valid', groups an int.
cnnbp::Conv2dParams conv_params(const char* op, const py::handle& stride, const py::handle& padding,
                                const py::handle& dilation, const py::handle& groups) {
    cnnbp::Conv2dParams params;
    const auto s = parse_pair(op, "stride", stride);
    params.stride_h = s[0], params.stride_w = s[1];
    if (py::isinstance<py::str>(padding)) {
        const auto mode = py::cast<std::string>(padding);
        if (mode != "same" && mode != "valid")
            throw py::value_error(std::string("[") + op +
                                  "] padding: expected 'same', 'valid', an int or a pair of ints, "
                                  "got " +
                                  std::string(py::repr(padding)));
        params.same_padding = mode == "same";
    } else {
        const auto p = parse_pair(op, "padding", padding);
        params.pad_h = p[0], params.pad_w = p[1];
    }
    const auto d = parse_pair(op, "dilation", dilation);
    params.dilation_h = d[0], params.dilation_w = d[1];
    params.groups = parse_int(op, "groups", groups);
    return params;
}

py::array conv2d(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj,
                 const py::handle& stride, const py::handle& padding, const py::handle& dilation,
                 const py::handle& groups) {
    const char* op = "conv2d";
    py::array x = as_array(op, "input", x_obj), w = as_array(op, "weight", w_obj);
    const DType dtype = float_dtype(op, "input", x);
    check_dtype(op, "weight", w, dtype);
    const OptionalBias bias(op, b_obj, dtype);
    const auto dims = cnnbp::conv2d_dims(shape_of(x), shape_of(w), bias.shape_or_null(),
                                         conv_params(op, stride, padding, dilation, groups));
    return weighted_forward(dtype, x, w, bias, cnnbp::conv2d_output_shape(dims),
                            [&](auto... pointers) { cnnbp::conv2d_forward(pointers..., dims); });
}

py::tuple conv2d_backward(const py::handle& dy_obj, const py::handle& x_obj,
                          const py::handle& w_obj, const py::handle& stride,
                          const py::handle& padding, const py::handle& dilation,
                          const py::handle& groups) {
    const char* op = "conv2d_backward";
    py::array dy = as_array(op, "doutput", dy_obj), x = as_array(op, "input", x_obj),
              w = as_array(op, "weight", w_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    check_dtype(op, "input", x, dtype);
    check_dtype(op, "weight", w, dtype);
    const auto dims = cnnbp::conv2d_dims(shape_of(x), shape_of(w), nullptr,
                                         conv_params(op, stride, padding, dilation, groups), op);
    cnnbp::conv2d_check_doutput(dims, shape_of(dy));
    return weighted_backward(dtype, dy, x, w, dims.K,
                             [&](auto... pointers) { cnnbp::conv2d_backward(pointers..., dims); });
}

// ---- max_pool2d --------------------------------------------------------------------------

// True or False (a NumPy bool too); torch's bool arguments take nothing else.
bool parse_bool(const char* op, const char* name, const py::handle& obj) {
    if (obj.ptr() == Py_True) return true;
    if (obj.ptr() == Py_False) return false;
    if (py::isinstance(obj, py::module_::import("numpy").attr("bool_"))) return py::cast<bool>(obj);
    throw py::type_error(std::string("[") + op + "] " + name + ": expected True or False, got " +
                         std::string(py::repr(obj)));
}

// The options of a pooling call beyond its window, each the default where an op has none
// (max_pool2d: no count_include_pad or divisor_override; avg_pool2d: no dilation).
struct PoolOptions {
    py::handle dilation = py::none();
    py::handle ceil_mode = py::none();
    py::handle count_include_pad = py::none();
    py::handle divisor_override = py::none();
};

// A pooling call's arguments, parsed once for forward and backward: int-or-pair window
// arguments (stride None means the kernel size, as torch), bools, an optional int divisor.
// The values are checked by pool2d_dims.
cnnbp::Pool2dParams pool_params(const char* op, const py::handle& kernel_size,
                                const py::handle& stride, const py::handle& padding,
                                const PoolOptions& options = {}) {
    auto k = parse_pair(op, "kernel_size", kernel_size);
    auto s = stride.is_none() ? k : parse_pair(op, "stride", stride);  // torch: stride = kernel
    auto p = parse_pair(op, "padding", padding);
    cnnbp::Pool2dParams params = cnnbp::pool2d_window(k, s, p);
    if (!options.dilation.is_none()) {
        const auto d = parse_pair(op, "dilation", options.dilation);
        params.dilation_h = d[0];
        params.dilation_w = d[1];
    }
    if (!options.ceil_mode.is_none())
        params.ceil_mode = parse_bool(op, "ceil_mode", options.ceil_mode);
    if (!options.count_include_pad.is_none())
        params.count_include_pad = parse_bool(op, "count_include_pad", options.count_include_pad);
    if (!options.divisor_override.is_none()) {
        const py::handle& v = options.divisor_override;
        if (py::isinstance<py::bool_>(v) || !PyIndex_Check(v.ptr()))
            throw py::type_error(std::string("[") + op +
                                 "] divisor_override: expected an int or None, got " +
                                 std::string(py::repr(v)));
        params.divisor_override = parse_int(op, "divisor_override", v);
    }
    return params;
}

py::tuple max_pool2d(const py::handle& x_obj, const py::handle& kernel_size,
                     const py::handle& stride, const py::handle& padding,
                     const py::handle& dilation, const py::handle& ceil_mode) {
    const char* op = "max_pool2d";
    py::array x = as_array(op, "input", x_obj);
    const DType dtype = float_dtype(op, "input", x);
    PoolOptions options;
    options.dilation = dilation;
    options.ceil_mode = ceil_mode;
    const auto dims =
        cnnbp::pool2d_dims(op, shape_of(x), pool_params(op, kernel_size, stride, padding, options));
    return dispatch(dtype, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        auto xc = contiguous<T>(x);
        auto y = empty_like_shape<T>(cnnbp::pool2d_output_shape(dims));
        auto idx = empty_like_shape<int64_t>(cnnbp::pool2d_output_shape(dims));
        T* y_ptr = y.mutable_data();
        int64_t* idx_ptr = idx.mutable_data();
        {
            KernelCall call;
            cnnbp::max_pool2d_forward<T>(y_ptr, idx_ptr, xc.data(), dims);
        }
        return py::make_tuple(y, idx);
    });
}

// A shape given as a sequence of ints.
Shape parse_shape(const char* op, const char* name, const py::handle& obj) {
    Shape shape;
    bool ok = py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj);
    if (ok)
        for (const py::handle& v : py::reinterpret_borrow<py::sequence>(obj)) {
            int64_t fast;
            if (exact_int(v, fast)) {
                shape.push_back(fast);
                continue;
            }
            if (py::isinstance<py::bool_>(v) || !PyIndex_Check(v.ptr())) {
                ok = false;
                break;
            }
            shape.push_back(index_value(op, name, v));
        }
    if (!ok)
        throw py::type_error(std::string("[") + op + "] " + name +
                             ": expected a sequence of ints, got " + std::string(py::repr(obj)));
    return shape;
}

py::array max_pool2d_backward(const py::handle& dy_obj, const py::handle& idx_obj,
                              const py::handle& x_shape_obj) {
    const char* op = "max_pool2d_backward";
    const Shape x_shape = parse_shape(op, "x_shape", x_shape_obj);
    py::array dy = as_array(op, "doutput", dy_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    auto idx = as_int64(op, "indices", idx_obj);
    const auto dims = cnnbp::max_pool2d_backward_dims(shape_of(dy), shape_of(idx), x_shape);
    cnnbp::check_pool_indices(idx.data(), idx.size(), dims.H * dims.W);
    return dispatch(dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto dyc = contiguous<T>(dy);
        auto dx = empty_like_shape<T>(x_shape);
        T* dx_ptr = dx.mutable_data();
        {  // the GIL is held again before the result is touched
            KernelCall call;
            cnnbp::max_pool2d_backward<T>(dx_ptr, dyc.data(), idx.data(), dims);
        }
        return dx;
    });
}

// ---- activations -------------------------------------------------------------------------

// a = kernel(z): `kernel(T* a, const T* z, int64_t count)` for T float or double.
template <typename Kernel>
py::array unary(const char* op, const py::handle& z_obj, Kernel kernel) {
    py::array z = as_array(op, "input", z_obj);
    const DType dtype = float_dtype(op, "input", z);
    cnnbp::checked_numel(op, "input", shape_of(z));  // a broadcast view may be too large to copy
    return dispatch(dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto zc = contiguous<T>(z);
        auto a = empty_like_shape<T>(shape_of(z));
        T* a_ptr = a.mutable_data();
        {  // the GIL is held again before the result is touched
            KernelCall call;
            kernel(a_ptr, zc.data(), zc.size());
        }
        return a;
    });
}

// dz = kernel(da, saved): `kernel(T* dz, const T* da, const T* saved, int64_t count)`.
template <typename Kernel>
py::array unary_backward(const char* op, const char* saved_name, const py::handle& da_obj,
                         const py::handle& saved_obj, Kernel kernel) {
    py::array da = as_array(op, "doutput", da_obj), saved = as_array(op, saved_name, saved_obj);
    const DType dtype = float_dtype(op, "doutput", da);
    check_dtype(op, saved_name, saved, dtype);
    cnnbp::check_same_shape(op, "doutput", shape_of(da), saved_name, shape_of(saved));
    cnnbp::checked_numel(op, "doutput", shape_of(da));
    return dispatch(dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto dac = contiguous<T>(da), sc = contiguous<T>(saved);
        auto dz = empty_like_shape<T>(shape_of(da));
        T* dz_ptr = dz.mutable_data();
        {  // the GIL is held again before the result is touched
            KernelCall call;
            kernel(dz_ptr, dac.data(), sc.data(), dac.size());
        }
        return dz;
    });
}

// An elementwise activation's pair: op(z) -> a, and op_backward(da, saved) -> dz, where
// saved is what the backward reads ("z", the input, or "a", the output).
template <void (*ForwardF)(float*, const float*, int64_t),
          void (*ForwardD)(double*, const double*, int64_t),
          void (*BackwardF)(float*, const float*, const float*, int64_t),
          void (*BackwardD)(double*, const double*, const double*, int64_t)>
void def_activation(py::module_& m, const char* op, const char* saved, const char* forward_doc,
                    const char* backward_doc) {
    m.def(
        op,
        [op](const py::handle& z) {
            return unary(op, z, [](auto* a, const auto* zp, int64_t n) {
                if constexpr (std::is_same_v<std::decay_t<decltype(*a)>, float>)
                    ForwardF(a, zp, n);
                else
                    ForwardD(a, zp, n);
            });
        },
        py::arg("z"), forward_doc);
    const std::string backward = std::string(op) + "_backward";
    m.def(
        backward.c_str(),
        [backward, saved](const py::handle& da, const py::handle& s) {
            return unary_backward(
                backward.c_str(), saved, da, s,
                [](auto* dz, const auto* dap, const auto* sp, int64_t n) {
                    if constexpr (std::is_same_v<std::decay_t<decltype(*dz)>, float>)
                        BackwardF(dz, dap, sp, n);
                    else
                        BackwardD(dz, dap, sp, n);
                });
        },
        py::arg("da"), py::arg(saved), backward_doc);
}

// leaky_relu's negative_slope: a float (TypeError otherwise), finite (ValueError otherwise).
double negative_slope_arg(const char* op, const py::handle& obj);

// gelu's approximate: the str 'none' or 'tanh' (another str: ValueError; not a str: TypeError).
cnnbp::GeluApproximate approximate_arg(const char* op, const py::handle& obj) {
    if (!py::isinstance<py::str>(obj))
        throw py::type_error(std::string("[") + op +
                             "] approximate: expected 'none' or 'tanh', got " +
                             std::string(py::repr(obj)));
    return cnnbp::parse_gelu_approximate(op, obj.cast<std::string>());
}

// The activations with options: leaky_relu(z, negative_slope) and gelu(z, approximate), their
// backward from the input z.
void def_activations_with_options(py::module_& m) {
    using py::arg;
    m.def(
        "leaky_relu",
        [](const py::handle& z, const py::handle& slope_obj) {
            const double slope = negative_slope_arg("leaky_relu", slope_obj);
            return unary("leaky_relu", z, [slope](auto* a, const auto* zp, int64_t n) {
                cnnbp::leaky_relu_forward(a, zp, n, slope);
            });
        },
        arg("z"), arg("negative_slope") = 0.01, "a = z where z > 0, else z * negative_slope");
    m.def(
        "leaky_relu_backward",
        [](const py::handle& da, const py::handle& z, const py::handle& slope_obj) {
            const char* op = "leaky_relu_backward";
            const double slope = negative_slope_arg(op, slope_obj);
            return unary_backward(op, "z", da, z,
                                  [slope](auto* dz, const auto* dap, const auto* zp, int64_t n) {
                                      cnnbp::leaky_relu_backward(dz, dap, zp, n, slope);
                                  });
        },
        arg("da"), arg("z"), arg("negative_slope") = 0.01,
        "dz = da where z > 0, else da * negative_slope");
    m.def(
        "gelu",
        [](const py::handle& z, const py::handle& approximate_obj) {
            const auto approximate = approximate_arg("gelu", approximate_obj);
            return unary("gelu", z, [approximate](auto* a, const auto* zp, int64_t n) {
                cnnbp::gelu_forward(a, zp, n, approximate);
            });
        },
        arg("z"), arg("approximate") = "none",
        "a = z * Phi(z): 'none', z * 0.5 * (1 + erf(z / sqrt(2))); 'tanh', 0.5 * z * (1 + "
        "tanh(sqrt(2 / pi) * (z + 0.044715 * z^3))), as torch.nn.functional.gelu");
    m.def(
        "gelu_backward",
        [](const py::handle& da, const py::handle& z, const py::handle& approximate_obj) {
            const char* op = "gelu_backward";
            const auto approximate = approximate_arg(op, approximate_obj);
            return unary_backward(
                op, "z", da, z,
                [approximate](auto* dz, const auto* dap, const auto* zp, int64_t n) {
                    cnnbp::gelu_backward(dz, dap, zp, n, approximate);
                });
        },
        arg("da"), arg("z"), arg("approximate") = "none",
        "dz = da * d(gelu)/dz, from the forward input z (torch's gelu_backward formulas)");
}

// softmax and log_softmax along dim: op(z, dim) -> a, op_backward(da, a, dim) -> dz, the
// backward from the output a. `Forward` and `Backward` are the kernels' wrappers, generic over T.
template <typename Forward, typename Backward>
void def_softmax(py::module_& m, const char* op, Forward forward, Backward backward,
                 const char* forward_doc, const char* backward_doc) {
    using py::arg;
    m.def(
        op,
        [op, forward](const py::handle& z_obj, const py::handle& dim_obj) {
            py::array z = as_array(op, "input", z_obj);
            const DType dtype = float_dtype(op, "input", z);
            const auto dims = cnnbp::softmax_dims(op, shape_of(z), parse_int(op, "dim", dim_obj));
            return one_array_kernel(dtype, z, shape_of(z),
                                    [&](auto* a, const auto* zp) { forward(a, zp, dims); });
        },
        arg("z"), arg("dim") = 1, forward_doc);
    const std::string backward_op = std::string(op) + "_backward";
    m.def(
        backward_op.c_str(),
        [backward_op, backward](const py::handle& da_obj, const py::handle& a_obj,
                                const py::handle& dim_obj) {
            const char* bop = backward_op.c_str();
            py::array da = as_array(bop, "doutput", da_obj), a = as_array(bop, "a", a_obj);
            const DType dtype = float_dtype(bop, "doutput", da);
            check_dtype(bop, "a", a, dtype);
            cnnbp::check_same_shape(bop, "doutput", shape_of(da), "a", shape_of(a));
            const auto dims = cnnbp::softmax_dims(bop, shape_of(a), parse_int(bop, "dim", dim_obj));
            return dispatch(dtype, [&](auto tag) -> py::array {
                using T = decltype(tag);
                auto dac = contiguous<T>(da), ac = contiguous<T>(a);
                auto dz = empty_like_shape<T>(shape_of(a));
                T* dz_ptr = dz.mutable_data();
                {  // the GIL is held again before the result is touched
                    KernelCall call;
                    backward(dz_ptr, dac.data(), ac.data(), dims);
                }
                return dz;
            });
        },
        arg("da"), arg("a"), arg("dim") = 1, backward_doc);
}

void def_softmaxes(py::module_& m) {
    def_softmax(
        m, "softmax",
        [](auto* a, const auto* z, const cnnbp::SoftmaxDims& d) {
            cnnbp::softmax_forward(a, z, d);
        },
        [](auto* dz, const auto* da, const auto* a, const cnnbp::SoftmaxDims& d) {
            cnnbp::softmax_backward(dz, da, a, d);
        },
        "a = exp(z) / sum(exp(z)) along dim (negative: from the end), computed stably",
        "dz = a * (da - sum(da * a)) along dim, from the forward output a");
    def_softmax(
        m, "log_softmax",
        [](auto* a, const auto* z, const cnnbp::SoftmaxDims& d) {
            cnnbp::log_softmax_forward(a, z, d);
        },
        [](auto* dz, const auto* da, const auto* a, const cnnbp::SoftmaxDims& d) {
            cnnbp::log_softmax_backward(dz, da, a, d);
        },
        "a = z - log(sum(exp(z))) along dim (negative: from the end), computed stably",
        "dz = da - exp(a) * sum(da) along dim, from the forward output a");
}

// ---- avg_pool2d, dropout -------------------------------------------------------------------

// avg_pool2d's options beyond its window.
PoolOptions avg_pool_options(const py::handle& ceil_mode, const py::handle& count_include_pad,
                             const py::handle& divisor_override) {
    PoolOptions options;
    options.ceil_mode = ceil_mode;
    options.count_include_pad = count_include_pad;
    options.divisor_override = divisor_override;
    return options;
}

py::array avg_pool2d(const py::handle& x_obj, const py::handle& kernel_size,
                     const py::handle& stride, const py::handle& padding,
                     const py::handle& ceil_mode, const py::handle& count_include_pad,
                     const py::handle& divisor_override) {
    const char* op = "avg_pool2d";
    py::array x = as_array(op, "input", x_obj);
    const DType dtype = float_dtype(op, "input", x);
    const auto dims = cnnbp::pool2d_dims(
        op, shape_of(x),
        pool_params(op, kernel_size, stride, padding,
                    avg_pool_options(ceil_mode, count_include_pad, divisor_override)));
    return one_array_kernel(
        dtype, x, cnnbp::pool2d_output_shape(dims),
        [&](auto* out, const auto* in) { cnnbp::avg_pool2d_forward(out, in, dims); });
}

py::array avg_pool2d_backward(const py::handle& dy_obj, const py::handle& x_shape_obj,
                              const py::handle& kernel_size, const py::handle& stride,
                              const py::handle& padding, const py::handle& ceil_mode,
                              const py::handle& count_include_pad,
                              const py::handle& divisor_override) {
    const char* op = "avg_pool2d_backward";
    const Shape x_shape = parse_shape(op, "x_shape", x_shape_obj);
    py::array dy = as_array(op, "doutput", dy_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    const auto dims = cnnbp::avg_pool2d_backward_dims(
        shape_of(dy), x_shape,
        pool_params(op, kernel_size, stride, padding,
                    avg_pool_options(ceil_mode, count_include_pad, divisor_override)));
    return one_array_kernel(dtype, dy, x_shape, [&](auto* out, const auto* in) {
        cnnbp::avg_pool2d_backward(out, in, dims);
    });
}

// ---- adaptive_avg_pool2d -------------------------------------------------------------------

// torch's output_size: an int, or a pair whose elements are ints or None (the input's size
// along that axis). The sizes are checked by adaptive_pool2d_dims.
cnnbp::AdaptiveOutputSize parse_output_size(const char* op, const py::handle& obj) {
    auto fail = [&]() -> py::type_error {
        return py::type_error(std::string("[") + op +
                              "] output_size: expected an int, or a pair of ints or None, got " +
                              std::string(py::repr(obj)));
    };
    auto element = [&](const py::handle& v) -> std::optional<int64_t> {
        int64_t fast;
        if (exact_int(v, fast)) return fast;
        if (py::isinstance<py::bool_>(v) || !PyIndex_Check(v.ptr())) throw fail();
        return index_value(op, "output_size", v);
    };
    if (PyIndex_Check(obj.ptr())) {  // ints, numpy integers, 0-d integer arrays
        const auto v = element(obj);
        return {v, v};
    }
    if (py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj)) {
        py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
        if (seq.size() != 2) throw fail();
        cnnbp::AdaptiveOutputSize out;
        for (size_t i = 0; i < 2; ++i) {
            const py::object v = seq[i];
            if (!v.is_none()) out[i] = element(v);
        }
        return out;
    }
    throw fail();
}

py::array adaptive_avg_pool2d(const py::handle& x_obj, const py::handle& output_size) {
    const char* op = "adaptive_avg_pool2d";
    py::array x = as_array(op, "input", x_obj);
    const DType dtype = float_dtype(op, "input", x);
    const auto dims =
        cnnbp::adaptive_pool2d_dims(op, shape_of(x), parse_output_size(op, output_size));
    return one_array_kernel(
        dtype, x, cnnbp::adaptive_pool2d_output_shape(dims),
        [&](auto* out, const auto* in) { cnnbp::adaptive_avg_pool2d_forward(out, in, dims); });
}

py::array adaptive_avg_pool2d_backward(const py::handle& dy_obj, const py::handle& x_shape_obj,
                                       const py::handle& output_size) {
    const char* op = "adaptive_avg_pool2d_backward";
    const Shape x_shape = parse_shape(op, "x_shape", x_shape_obj);
    py::array dy = as_array(op, "doutput", dy_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    const auto dims = cnnbp::adaptive_avg_pool2d_backward_dims(shape_of(dy), x_shape,
                                                               parse_output_size(op, output_size));
    return one_array_kernel(dtype, dy, x_shape, [&](auto* out, const auto* in) {
        cnnbp::adaptive_avg_pool2d_backward(out, in, dims);
    });
}

void def_adaptive_avg_pool2d(py::module_& m) {
    using py::arg;
    m.def("adaptive_avg_pool2d", &adaptive_avg_pool2d, arg("x"), arg("output_size"),
          "y (N, C, P, Q) = adaptive_avg_pool2d(x (N, C, H, W), output_size (P, Q)): output cell "
          "(p, q) is the mean of input rows floor(p*H/P) to ceil((p+1)*H/P) and columns "
          "floor(q*W/Q) to ceil((q+1)*W/Q), as torch; output_size an int or an (h, w) pair "
          "whose None elements keep the input's size.");
    m.def("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward, arg("dy"), arg("x_shape"),
          arg("output_size"),
          "dx (x_shape): each cell gets dy / window size from every window covering it.");
}

// A real number (Python or NumPy float or int, not a bool); its range is the validation's.
double parse_float(const char* op, const char* name, const py::handle& obj) {
    PyObject* o = obj.ptr();
    if (PyFloat_Check(o)) return PyFloat_AS_DOUBLE(o);
    if (!py::isinstance<py::bool_>(obj) && !PyComplex_Check(o) && !py::isinstance<py::array>(obj) &&
        PyNumber_Check(o)) {
        const double value = PyFloat_AsDouble(o);
        if (!(value == -1.0 && PyErr_Occurred())) return value;
        PyErr_Clear();
    }
    throw py::type_error(std::string("[") + op + "] " + name + ": expected a float, got " +
                         std::string(py::repr(obj)));
}

double negative_slope_arg(const char* op, const py::handle& obj) {
    return cnnbp::leaky_relu_slope(op, parse_float(op, "negative_slope", obj));
}

// A Python int (or NumPy integer) in [0, 2^64): the C++ seed is a uint64_t.
uint64_t parse_seed(const char* op, const py::handle& obj) {
    if (py::isinstance<py::bool_>(obj) || !PyIndex_Check(obj.ptr()))
        throw py::type_error(std::string("[") + op + "] seed: expected an int, got " +
                             std::string(py::repr(obj)));
    const auto value = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (!value) throw py::error_already_set();
    const unsigned long long seed = PyLong_AsUnsignedLongLong(value.ptr());
    if (seed == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::value_error(std::string("[") + op +
                              "] seed: expected an int in [0, 2**64), got " +
                              std::string(py::repr(value)));
    }
    return seed;
}

py::tuple dropout(const py::handle& x_obj, const py::handle& p_obj, const py::handle& seed_obj) {
    const char* op = "dropout";
    py::array x = as_array(op, "input", x_obj);
    const DType dtype = float_dtype(op, "input", x);
    const double p = parse_float(op, "p", p_obj);
    const auto params = cnnbp::dropout_params(op, p, parse_seed(op, seed_obj));
    return dispatch(dtype, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        auto xc = contiguous<T>(x);
        auto y = empty_like_shape<T>(shape_of(x));
        auto mask = empty_like_shape<bool>(shape_of(x));
        T* y_ptr = y.mutable_data();
        // NumPy's bool is one byte holding 0 or 1: the kernel writes exactly those
        auto* mask_ptr = reinterpret_cast<uint8_t*>(mask.mutable_data());
        {
            KernelCall call;
            cnnbp::dropout_forward<T>(y_ptr, mask_ptr, xc.data(), xc.size(), params);
        }
        return py::make_tuple(y, mask);
    });
}

py::array dropout_backward(const py::handle& dy_obj, const py::handle& mask_obj,
                           const py::handle& p_obj) {
    const char* op = "dropout_backward";
    py::array dy = as_array(op, "doutput", dy_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    py::array mask = as_array(op, "mask", mask_obj);
    if (mask.dtype().kind() != 'b')
        throw py::type_error(std::string("[") + op + "] mask: expected a bool array, got " +
                             dtype_name(mask));
    const auto params = cnnbp::dropout_params(op, parse_float(op, "p", p_obj));
    cnnbp::check_same_shape(op, "doutput", shape_of(dy), "mask", shape_of(mask));
    // the converting constructor raises where ensure() returns a null array (and clears
    // the error, so that error_already_set would have nothing to raise)
    auto mc = py::array_t<bool, py::array::c_style>(mask);
    return dispatch(dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto dyc = contiguous<T>(dy);
        auto dx = empty_like_shape<T>(shape_of(dy));
        T* dx_ptr = dx.mutable_data();
        // read as bytes, any nonzero byte is kept (a bool view of other bytes is no UB)
        const auto* mask_ptr = reinterpret_cast<const uint8_t*>(mc.data());
        {  // the GIL is held again before the result is touched
            KernelCall call;
            cnnbp::dropout_backward<T>(dx_ptr, dyc.data(), mask_ptr, dyc.size(), params);
        }
        return dx;
    });
}

void def_avg_pool2d_dropout(py::module_& m) {
    using py::arg;
    m.def("avg_pool2d", &avg_pool2d, arg("x"), arg("kernel_size"), arg("stride") = py::none(),
          arg("padding") = 0, arg("ceil_mode") = false, arg("count_include_pad") = true,
          arg("divisor_override") = py::none(),
          "y (N, C, P, Q) = avg_pool2d(x (N, C, H, W), ...): the sum of each window over its "
          "divisor, as torch: divisor_override, else the window's cells inside the padded input "
          "(count_include_pad) or inside the input.");
    m.def("avg_pool2d_backward", &avg_pool2d_backward, arg("dy"), arg("x_shape"),
          arg("kernel_size"), arg("stride") = py::none(), arg("padding") = 0,
          arg("ceil_mode") = false, arg("count_include_pad") = true,
          arg("divisor_override") = py::none(),
          "dx (x_shape): each cell gets dy / divisor from every window covering it.");
    m.def("dropout", &dropout, arg("x"), arg("p") = 0.5, arg("seed") = 0,
          "(y, mask) = dropout(x, p, seed): mask (bool, x's shape) keeps each element with "
          "probability 1 - p, drawn from (seed, flat index) by a counter-based hash; "
          "y = x * mask / (1 - p); p == 1 gives x * 0.");
    m.def("dropout_backward", &dropout_backward, arg("dy"), arg("mask"), arg("p"),
          "dx = dy * mask / (1 - p) (dy * 0 for p == 1)");
}

// ---- batch_norm2d --------------------------------------------------------------------------

// An optional per-channel array of the call's dtype (weight, bias, running stats), C-contiguous;
// `in_place` (running stats while training): updated in place, so it must be a writable
// C-contiguous array of the dtype already, not a copy.
template <typename T>
struct ChannelArray {
    py::array_t<T, py::array::c_style> array;
    Shape shape;
    bool present = false;

    ChannelArray(const char* op, const char* name, const py::handle& obj, DType dtype,
                 bool in_place = false) {
        if (obj.is_none()) return;
        py::array a = as_array(op, name, obj);
        check_dtype(op, name, a, dtype);
        if (in_place && (!is_plain_array<T>(a) || !a.writeable()))
            throw py::value_error(std::string("[") + op + "] " + name +
                                  ": expected a writable C-contiguous array of native byte "
                                  "order (updated in place when training), got " +
                                  (a.writeable() ? "another layout" : "a read-only array"));
        array = contiguous<T>(a);
        shape = shape_of(array);
        present = true;
    }
    const Shape* shape_or_null() const { return present ? &shape : nullptr; }
    const T* data() const { return present ? array.data() : nullptr; }
    T* mutable_data() { return present ? array.mutable_data() : nullptr; }
};

py::tuple batch_norm2d(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj,
                       const py::handle& mean_obj, const py::handle& var_obj,
                       const py::handle& training_obj, const py::handle& momentum_obj,
                       const py::handle& eps_obj) {
    const char* op = "batch_norm2d";
    py::array x = as_array(op, "input", x_obj);
    const DType dtype = float_dtype(op, "input", x);
    const auto params = cnnbp::batch_norm2d_params(op, parse_bool(op, "training", training_obj),
                                                   parse_float(op, "momentum", momentum_obj),
                                                   parse_float(op, "eps", eps_obj));
    return dispatch(dtype, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        const ChannelArray<T> w(op, "weight", w_obj, dtype), b(op, "bias", b_obj, dtype);
        ChannelArray<T> rm(op, "running_mean", mean_obj, dtype, params.training),
            rv(op, "running_var", var_obj, dtype, params.training);
        const Shape x_shape = shape_of(x);
        const auto dims =
            cnnbp::batch_norm2d_dims(op, x_shape, w.shape_or_null(), b.shape_or_null(),
                                     rm.shape_or_null(), rv.shape_or_null(), params);
        auto xc = contiguous<T>(x);
        auto y = empty_like_shape<T>(x_shape);
        // torch's native_batch_norm: the batch statistics while training, empty arrays else
        const int64_t stats = params.training ? dims.C : 0;
        auto mean = empty_like_shape<T>({stats}), invstd = empty_like_shape<T>({stats});
        T *y_ptr = y.mutable_data(), *mean_ptr = mean.mutable_data(),
          *invstd_ptr = invstd.mutable_data(), *rm_ptr = rm.mutable_data(),
          *rv_ptr = rv.mutable_data();
        {
            KernelCall call;
            cnnbp::batch_norm2d_forward(y_ptr, mean_ptr, invstd_ptr, xc.data(), w.data(), b.data(),
                                        rm_ptr, rv_ptr, dims, params);
        }
        return py::make_tuple(y, mean, invstd);
    });
}

py::tuple batch_norm2d_backward(const py::handle& dy_obj, const py::handle& x_obj,
                                const py::handle& w_obj, const py::handle& mean_obj,
                                const py::handle& invstd_obj, const py::handle& training_obj) {
    const char* op = "batch_norm2d_backward";
    py::array dy = as_array(op, "doutput", dy_obj), x = as_array(op, "input", x_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    check_dtype(op, "input", x, dtype);
    const bool training = parse_bool(op, "training", training_obj);
    return dispatch(dtype, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        const ChannelArray<T> w(op, "weight", w_obj, dtype), mean(op, "mean", mean_obj, dtype),
            invstd(op, "invstd", invstd_obj, dtype);
        if (!mean.present || !invstd.present)
            throw py::type_error(std::string("[") + op + "] " + (mean.present ? "invstd" : "mean") +
                                 ": expected an array, got None");
        const Shape x_shape = shape_of(x);
        const auto dims = cnnbp::batch_norm2d_backward_dims(
            shape_of(dy), x_shape, w.shape_or_null(), mean.shape, invstd.shape);
        auto dyc = contiguous<T>(dy), xc = contiguous<T>(x);
        auto dx = empty_like_shape<T>(x_shape);
        auto dw = empty_like_shape<T>({dims.C}), db = empty_like_shape<T>({dims.C});
        T *dx_ptr = dx.mutable_data(), *dw_ptr = dw.mutable_data(), *db_ptr = db.mutable_data();
        {
            KernelCall call;
            cnnbp::batch_norm2d_backward(dx_ptr, dw_ptr, db_ptr, dyc.data(), xc.data(), w.data(),
                                         mean.data(), invstd.data(), dims, training);
        }
        return py::make_tuple(dx, dw, db);
    });
}

void def_batch_norm2d(py::module_& m) {
    using py::arg;
    m.def("batch_norm2d", &batch_norm2d, arg("x"), arg("weight") = py::none(),
          arg("bias") = py::none(), arg("running_mean") = py::none(),
          arg("running_var") = py::none(), arg("training") = false, arg("momentum") = 0.1,
          arg("eps") = 1e-5,
          "(y, save_mean, save_invstd) = batch_norm2d(x (N, C, H, W), weight (C,), bias (C,), "
          "running_mean (C,), running_var (C,), training, momentum, eps): y = (x - mean) * invstd "
          "* weight + bias with the batch's statistics (training; the running ones updated in "
          "place, the variance unbiased) or the running ones (save_mean, save_invstd then empty).");
    m.def("batch_norm2d_backward", &batch_norm2d_backward, arg("dy"), arg("x"), arg("weight"),
          arg("mean"), arg("invstd"), arg("training") = true,
          "(dx, dweight, dbias) = gradients of batch_norm2d given dy: training, through the "
          "batch statistics (mean, invstd: save_mean, save_invstd); else mean = running_mean and "
          "invstd = 1 / sqrt(running_var + eps), constants: dx = dy * weight * invstd.");
}

// ---- linear ------------------------------------------------------------------------------

py::array linear(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj) {
    const char* op = "linear";
    py::array x = as_array(op, "input", x_obj), w = as_array(op, "weight", w_obj);
    const DType dtype = float_dtype(op, "input", x);
    check_dtype(op, "weight", w, dtype);
    const OptionalBias bias(op, b_obj, dtype);
    const Shape x_shape = shape_of(x);
    const auto dims = cnnbp::linear_dims(x_shape, shape_of(w), bias.shape_or_null());
    Shape y_shape = x_shape;
    y_shape.back() = dims.OUT;
    return weighted_forward(dtype, x, w, bias, y_shape,
                            [&](auto... pointers) { cnnbp::linear_forward(pointers..., dims); });
}

py::tuple linear_backward(const py::handle& dy_obj, const py::handle& x_obj,
                          const py::handle& w_obj) {
    const char* op = "linear_backward";
    py::array dy = as_array(op, "doutput", dy_obj), x = as_array(op, "input", x_obj),
              w = as_array(op, "weight", w_obj);
    const DType dtype = float_dtype(op, "doutput", dy);
    check_dtype(op, "input", x, dtype);
    check_dtype(op, "weight", w, dtype);
    const Shape x_shape = shape_of(x);
    const auto dims = cnnbp::linear_dims(x_shape, shape_of(w), nullptr, op);
    cnnbp::linear_check_doutput(dims, x_shape, shape_of(dy));
    return weighted_backward(dtype, dy, x, w, dims.OUT,
                             [&](auto... pointers) { cnnbp::linear_backward(pointers..., dims); });
}

// ---- losses ------------------------------------------------------------------------------

// The options every loss shares: reduction (arrays.hpp's reduction_arg) and optional
// weight arrays.

// An optional array of the call's dtype: None, or the array.
py::object optional_array(const char* op, const char* name, const py::handle& obj, DType dtype) {
    if (obj.is_none()) return py::none();
    py::array array = as_array(op, name, obj);
    check_dtype(op, name, array, dtype);
    return std::move(array);
}

py::array as_given(const py::object& obj) { return py::reinterpret_borrow<py::array>(obj); }

// dL/d(loss) for a backward: a number (1 when None) for a reduced loss; an array of the
// loss's shape for reduction 'none'.
template <typename T>
struct GradOutput {
    double grad = 1.0;
    bool per_element = false;
    py::array_t<T, py::array::c_style> values;
    const T* data() const { return per_element ? values.data() : nullptr; }
};

template <typename T>
GradOutput<T> grad_output_arg(const char* op, const py::handle& obj, cnnbp::Reduction reduction,
                              const cnnbp::Shape& loss_shape) {
    GradOutput<T> out;
    if (reduction == cnnbp::Reduction::None) {
        if (obj.is_none())
            throw std::invalid_argument(
                std::string("[") + op + "] grad_output: expected an array of shape " +
                cnnbp::shape_str(loss_shape) + " (the loss's, reduction='none'), got None");
        py::array array = as_array(op, "grad_output", obj);
        check_dtype(op, "grad_output", array, std::is_same_v<T, float> ? DType::f32 : DType::f64);
        cnnbp::check_same_shape(op, "the loss", loss_shape, "grad_output", shape_of(array));
        out.values = contiguous<T>(array);
        out.per_element = true;
        return out;
    }
    if (obj.is_none()) return out;
    if (py::isinstance<py::array>(obj) && py::reinterpret_borrow<py::array>(obj).ndim() != 0)
        throw std::invalid_argument(
            std::string("[") + op +
            "] grad_output: expected a number (the loss is reduced), got shape " +
            cnnbp::shape_str(shape_of(py::reinterpret_borrow<py::array>(obj))));
    const double value = PyFloat_AsDouble(obj.ptr());
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw std::invalid_argument(std::string("[") + op +
                                    "] grad_output: expected a number (the loss is reduced), got " +
                                    std::string(py::repr(obj)));
    }
    out.grad = value;
    return out;
}

// A weight of the binary losses, expanded to the input's shape (empty when None).
template <typename T>
std::vector<T> expanded(const char* op, const char* name, const py::object& weight,
                        const cnnbp::Shape& shape) {
    if (weight.is_none()) return {};
    cnnbp::check_expandable(op, name, shape_of(as_given(weight)), shape);
    auto wc = contiguous<T>(as_given(weight));
    std::vector<T> out(size_t(cnnbp::numel(shape)));
    cnnbp::expand_to(out.data(), shape, wc.data(), shape_of(as_given(weight)));
    return out;
}

template <typename T>
const T* data_or_null(const std::vector<T>& v) {
    return v.empty() ? nullptr : v.data();
}

// BCE and BCE-with-logits share shapes and dtype rules: prediction and target alike.
struct BinaryLossArgs {
    py::array prediction, target;
    py::object weight, pos_weight;  // None or an array
    DType dtype;
    cnnbp::Reduction reduction;
    // torch's defaults: the fast kernels
    bool plain() const {
        return weight.is_none() && pos_weight.is_none() && reduction == cnnbp::Reduction::Mean;
    }
};

BinaryLossArgs binary_loss_args(const char* op, const py::handle& p_obj, const py::handle& y_obj,
                                const py::handle& weight, const py::handle& pos_weight,
                                const py::handle& reduction) {
    py::array p = as_array(op, "input", p_obj), y = as_array(op, "target", y_obj);
    const DType dtype = float_dtype(op, "input", p);
    check_dtype(op, "target", y, dtype);
    cnnbp::check_bce_shapes(op, shape_of(p), shape_of(y));
    BinaryLossArgs args{p,
                        y,
                        optional_array(op, "weight", weight, dtype),
                        optional_array(op, "pos_weight", pos_weight, dtype),
                        dtype,
                        reduction_arg(op, reduction)};
    const auto shape = shape_of(p);
    if (!args.weight.is_none())
        cnnbp::check_expandable(op, "weight", shape_of(as_given(args.weight)), shape);
    if (!args.pos_weight.is_none())
        cnnbp::check_expandable(op, "pos_weight", shape_of(as_given(args.pos_weight)), shape);
    return args;
}

template <bool kProbabilities>
py::object binary_loss(const char* op, const py::handle& p_obj, const py::handle& y_obj,
                       const py::handle& weight_obj, const py::handle& pos_weight_obj,
                       const py::handle& reduction_obj) {
    auto args = binary_loss_args(op, p_obj, y_obj, weight_obj, pos_weight_obj, reduction_obj);
    return dispatch(args.dtype, [&](auto tag) -> py::object {
        using T = decltype(tag);
        auto pc = contiguous<T>(args.prediction), yc = contiguous<T>(args.target);
        if constexpr (kProbabilities) cnnbp::check_probabilities<T>(op, pc.data(), pc.size());
        const T *p_ptr = pc.data(), *y_ptr = yc.data();
        const int64_t count = pc.size();
        if (args.plain()) {
            double value;
            {  // the GIL is held again before the result is made
                KernelCall call;
                if constexpr (kProbabilities)
                    value = cnnbp::binary_cross_entropy_forward<T>(p_ptr, y_ptr, count);
                else
                    value = cnnbp::binary_cross_entropy_with_logits_forward<T>(p_ptr, y_ptr, count);
            }
            return py::float_(value);
        }
        const auto shape = shape_of(args.prediction);
        const auto weight = expanded<T>(op, "weight", args.weight, shape);
        const auto pos_weight = expanded<T>(op, "pos_weight", args.pos_weight, shape);
        const bool none = args.reduction == cnnbp::Reduction::None;
        py::array_t<T> losses = none ? empty_like_shape<T>(shape) : py::array_t<T>();
        T* l_ptr = none ? losses.mutable_data() : nullptr;
        double value;
        {
            KernelCall call;
            if constexpr (kProbabilities)
                value = cnnbp::binary_cross_entropy_forward<T>(
                    l_ptr, p_ptr, y_ptr, data_or_null(weight), count, args.reduction);
            else
                value = cnnbp::binary_cross_entropy_with_logits_forward<T>(
                    l_ptr, p_ptr, y_ptr, data_or_null(weight), data_or_null(pos_weight), count,
                    args.reduction);
        }
        if (none) return std::move(losses);
        return py::float_(value);
    });
}

template <bool kProbabilities>
py::array binary_loss_backward(const char* op, const py::handle& p_obj, const py::handle& y_obj,
                               const py::handle& weight_obj, const py::handle& pos_weight_obj,
                               const py::handle& reduction_obj, const py::handle& grad_obj) {
    auto args = binary_loss_args(op, p_obj, y_obj, weight_obj, pos_weight_obj, reduction_obj);
    return dispatch(args.dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        const auto shape = shape_of(args.prediction);
        const auto g = grad_output_arg<T>(op, grad_obj, args.reduction, shape);
        auto pc = contiguous<T>(args.prediction), yc = contiguous<T>(args.target);
        if constexpr (kProbabilities) cnnbp::check_probabilities<T>(op, pc.data(), pc.size());
        auto grad = empty_like_shape<T>(shape);
        T* g_ptr = grad.mutable_data();
        const auto weight = expanded<T>(op, "weight", args.weight, shape);
        const auto pos_weight = expanded<T>(op, "pos_weight", args.pos_weight, shape);
        {  // the GIL is held again before the result is touched
            KernelCall call;
            if (args.plain() && g.grad == 1.0) {
                if constexpr (kProbabilities)
                    cnnbp::binary_cross_entropy_backward<T>(g_ptr, pc.data(), yc.data(), pc.size());
                else
                    cnnbp::binary_cross_entropy_with_logits_backward<T>(g_ptr, pc.data(), yc.data(),
                                                                        pc.size());
            } else if constexpr (kProbabilities) {
                cnnbp::binary_cross_entropy_backward<T>(g_ptr, pc.data(), yc.data(),
                                                        data_or_null(weight), pc.size(),
                                                        args.reduction, g.data(), g.grad);
            } else {
                cnnbp::binary_cross_entropy_with_logits_backward<T>(
                    g_ptr, pc.data(), yc.data(), data_or_null(weight), data_or_null(pos_weight),
                    pc.size(), args.reduction, g.data(), g.grad);
            }
        }
        return grad;
    });
}

// Cross-entropy: class indices (an integer array) or class probabilities (floats of the
// logits' shape and dtype) as the target.
struct CrossEntropyArgs {
    py::array logits, target_values;
    py::object weight;  // None or (K,)
    py::array_t<int64_t, py::array::c_style> labels;
    DType dtype;
    cnnbp::CrossEntropyDims dims;
    cnnbp::CrossEntropyParams params;
    bool plain() const {  // torch's defaults on (N, K): the fast kernels
        return weight.is_none() && !dims.probabilities && dims.S == 1 && logits.ndim() == 2 &&
               params.reduction == cnnbp::Reduction::Mean && params.label_smoothing == 0.0;
    }
};

CrossEntropyArgs cross_entropy_args(const char* op, const py::handle& z_obj,
                                    const py::handle& target_obj, const py::handle& weight_obj,
                                    int64_t ignore_index, const py::handle& reduction,
                                    double label_smoothing) {
    py::array z = as_array(op, "logits", z_obj);
    const DType dtype = float_dtype(op, "logits", z);
    CrossEntropyArgs args;
    args.logits = z;
    args.dtype = dtype;
    py::array target = as_array(op, "labels", target_obj);
    // floats of the logits' shape are class probabilities; any other target is class indices
    const bool probabilities = target.dtype().kind() == 'f' && shape_of(target) == shape_of(z);
    if (probabilities) {
        check_dtype(op, "target", target, dtype);
        args.target_values = target;
    } else {
        args.labels = as_int64(op, "labels", target_obj);
    }
    args.dims = cnnbp::cross_entropy_dims(op, shape_of(z), shape_of(target), probabilities);
    args.params = cnnbp::cross_entropy_params(op, reduction_arg(op, reduction), ignore_index,
                                              label_smoothing);
    cnnbp::check_ignore_index(op, args.dims, args.params);
    args.weight = optional_array(op, "weight", weight_obj, dtype);
    if (!args.weight.is_none())
        cnnbp::check_class_weight(op, args.dims, shape_of(as_given(args.weight)));
    if (!probabilities)
        cnnbp::check_labels(op, args.labels.data(), args.dims.N * args.dims.S, args.dims.K,
                            ignore_index);
    return args;
}

// true when some label is ignore_index (the fast kernels count every label)
bool any_ignored(const CrossEntropyArgs& args) {
    const int64_t* labels = args.labels.data();
    return std::find(labels, labels + args.labels.size(), args.params.ignore_index) !=
           labels + args.labels.size();
}

py::object cross_entropy(const py::handle& z_obj, const py::handle& target_obj,
                         const py::handle& weight_obj, int64_t ignore_index,
                         const py::handle& reduction, double label_smoothing) {
    auto args = cross_entropy_args("cross_entropy", z_obj, target_obj, weight_obj, ignore_index,
                                   reduction, label_smoothing);
    return dispatch(args.dtype, [&](auto tag) -> py::object {
        using T = decltype(tag);
        auto zc = contiguous<T>(args.logits);
        const T* z_ptr = zc.data();
        if (args.plain() && !any_ignored(args)) {
            const int64_t* labels_ptr = args.labels.data();
            double value;
            {  // the GIL is held again before the result is made
                KernelCall call;
                value =
                    cnnbp::cross_entropy_forward<T>(z_ptr, labels_ptr, args.dims.N, args.dims.K);
            }
            return py::float_(value);
        }
        py::array_t<T, py::array::c_style> target, weight;
        if (args.dims.probabilities) target = contiguous<T>(args.target_values);
        if (!args.weight.is_none()) weight = contiguous<T>(as_given(args.weight));
        const bool none = args.params.reduction == cnnbp::Reduction::None;
        py::array_t<T> losses =
            none ? empty_like_shape<T>(cnnbp::cross_entropy_loss_shape(shape_of(args.logits)))
                 : py::array_t<T>();
        T* l_ptr = none ? losses.mutable_data() : nullptr;
        const int64_t* labels_ptr = args.dims.probabilities ? nullptr : args.labels.data();
        const T* t_ptr = args.dims.probabilities ? target.data() : nullptr;
        const T* w_ptr = args.weight.is_none() ? nullptr : weight.data();
        double value;
        {
            KernelCall call;
            value = cnnbp::cross_entropy_forward<T>(l_ptr, z_ptr, labels_ptr, t_ptr, w_ptr,
                                                    args.dims, args.params);
        }
        if (none) return std::move(losses);
        return py::float_(value);
    });
}

py::array cross_entropy_backward(const py::handle& z_obj, const py::handle& target_obj,
                                 const py::handle& weight_obj, int64_t ignore_index,
                                 const py::handle& reduction, double label_smoothing,
                                 const py::handle& grad_obj) {
    const char* op = "cross_entropy_backward";
    auto args = cross_entropy_args(op, z_obj, target_obj, weight_obj, ignore_index, reduction,
                                   label_smoothing);
    return dispatch(args.dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        const auto g = grad_output_arg<T>(op, grad_obj, args.params.reduction,
                                          cnnbp::cross_entropy_loss_shape(shape_of(args.logits)));
        auto zc = contiguous<T>(args.logits);
        auto dz = empty_like_shape<T>(shape_of(args.logits));
        T* dz_ptr = dz.mutable_data();
        if (args.plain() && g.grad == 1.0 && !any_ignored(args)) {
            const T* z_ptr = zc.data();
            const int64_t* labels_ptr = args.labels.data();
            {  // the GIL is held again before the result is returned (a new reference)
                KernelCall call;
                cnnbp::cross_entropy_backward<T>(dz_ptr, z_ptr, labels_ptr, args.dims.N,
                                                 args.dims.K);
            }
            return dz;
        }
        py::array_t<T, py::array::c_style> target, weight;
        if (args.dims.probabilities) target = contiguous<T>(args.target_values);
        if (!args.weight.is_none()) weight = contiguous<T>(as_given(args.weight));
        const int64_t* labels_ptr = args.dims.probabilities ? nullptr : args.labels.data();
        const T* t_ptr = args.dims.probabilities ? target.data() : nullptr;
        const T* w_ptr = args.weight.is_none() ? nullptr : weight.data();
        {  // the GIL is held again before the result is touched
            KernelCall call;
            cnnbp::cross_entropy_backward<T>(dz_ptr, zc.data(), labels_ptr, t_ptr, w_ptr, args.dims,
                                             args.params, g.data(), g.grad);
        }
        return dz;
    });
}

// nll_loss: log-probabilities and class indices (an integer array), torch's options.
struct NllLossArgs {
    py::array input;
    py::object weight;  // None or (K,)
    py::array_t<int64_t, py::array::c_style> labels;
    DType dtype;
    cnnbp::CrossEntropyDims dims;
    cnnbp::CrossEntropyParams params;
};

NllLossArgs nll_loss_args(const char* op, const py::handle& input_obj, const py::handle& target_obj,
                          const py::handle& weight_obj, int64_t ignore_index,
                          const py::handle& reduction) {
    NllLossArgs args;
    args.input = as_array(op, "input", input_obj);
    args.dtype = float_dtype(op, "input", args.input);
    args.labels = as_int64(op, "labels", target_obj);
    args.dims =
        cnnbp::cross_entropy_dims(op, shape_of(args.input), shape_of(args.labels), false, "input");
    args.params = cnnbp::cross_entropy_params(op, reduction_arg(op, reduction), ignore_index, 0.0);
    args.weight = optional_array(op, "weight", weight_obj, args.dtype);
    if (!args.weight.is_none())
        cnnbp::check_class_weight(op, args.dims, shape_of(as_given(args.weight)));
    cnnbp::check_labels(op, args.labels.data(), args.dims.N * args.dims.S, args.dims.K,
                        ignore_index);
    return args;
}

py::object nll_loss(const py::handle& input_obj, const py::handle& target_obj,
                    const py::handle& weight_obj, int64_t ignore_index,
                    const py::handle& reduction) {
    auto args =
        nll_loss_args("nll_loss", input_obj, target_obj, weight_obj, ignore_index, reduction);
    return dispatch(args.dtype, [&](auto tag) -> py::object {
        using T = decltype(tag);
        auto xc = contiguous<T>(args.input);
        py::array_t<T, py::array::c_style> weight;
        if (!args.weight.is_none()) weight = contiguous<T>(as_given(args.weight));
        const bool none = args.params.reduction == cnnbp::Reduction::None;
        py::array_t<T> losses =
            none ? empty_like_shape<T>(cnnbp::cross_entropy_loss_shape(shape_of(args.input)))
                 : py::array_t<T>();
        T* l_ptr = none ? losses.mutable_data() : nullptr;
        const T* w_ptr = args.weight.is_none() ? nullptr : weight.data();
        double value;
        {  // the GIL is held again before the result is made
            KernelCall call;
            value = cnnbp::nll_loss_forward<T>(l_ptr, xc.data(), args.labels.data(), w_ptr,
                                               args.dims, args.params);
        }
        if (none) return std::move(losses);
        return py::float_(value);
    });
}

py::array nll_loss_backward(const py::handle& input_obj, const py::handle& target_obj,
                            const py::handle& weight_obj, int64_t ignore_index,
                            const py::handle& reduction, const py::handle& grad_obj) {
    const char* op = "nll_loss_backward";
    auto args = nll_loss_args(op, input_obj, target_obj, weight_obj, ignore_index, reduction);
    return dispatch(args.dtype, [&](auto tag) -> py::array {
        using T = decltype(tag);
        const auto g = grad_output_arg<T>(op, grad_obj, args.params.reduction,
                                          cnnbp::cross_entropy_loss_shape(shape_of(args.input)));
        py::array_t<T, py::array::c_style> weight;
        if (!args.weight.is_none()) weight = contiguous<T>(as_given(args.weight));
        const T* w_ptr = args.weight.is_none() ? nullptr : weight.data();
        auto dx = empty_like_shape<T>(shape_of(args.input));
        T* dx_ptr = dx.mutable_data();
        {  // the GIL is held again before the result is touched
            KernelCall call;
            cnnbp::nll_loss_backward<T>(dx_ptr, args.labels.data(), w_ptr, args.dims, args.params,
                                        g.data(), g.grad);
        }
        return dx;
    });
}

int64_t conv2d_workspace_bytes(const py::handle& x_shape, const py::handle& w_shape,
                               const py::handle& stride, const py::handle& padding,
                               const py::handle& dtype, const py::handle& dilation,
                               const py::handle& groups) {
    const char* op = "conv2d_workspace_bytes";
    const auto dims =
        cnnbp::conv2d_dims(parse_shape(op, "x_shape", x_shape), parse_shape(op, "w_shape", w_shape),
                           nullptr, conv_params(op, stride, padding, dilation, groups), op);
    py::dtype dt;
    try {
        dt = py::dtype::from_args(py::reinterpret_borrow<py::object>(dtype));
    } catch (const py::error_already_set&) {  // not a dtype at all ("foo", 3.5)
        throw py::type_error(std::string("[") + op + "] dtype: expected float32 or float64, got " +
                             std::string(py::repr(dtype)));
    }
    if (dt.kind() != 'f' || (dt.itemsize() != 4 && dt.itemsize() != 8))
        throw py::type_error(std::string("[") + op + "] dtype: expected float32 or float64, got " +
                             std::string(py::str(dt)));
    const int64_t threads = cnnbp::get_num_threads();
    return dt.itemsize() == 4 ? cnnbp::conv2d_workspace_bytes<float>(dims, threads)
                              : cnnbp::conv2d_workspace_bytes<double>(dims, threads);
}

// A binary loss's pair: op(input, y, weight, [pos_weight,] reduction) -> the loss (a float,
// or an array for reduction='none'), and op_backward(..., grad_output) -> dL/dinput; the
// input is probabilities (BCE) or logits (with_logits, which alone has pos_weight).
template <bool probabilities>
void def_binary_loss(py::module_& m, const char* op, const char* input, const char* doc,
                     const char* backward_doc) {
    using py::arg;
    const std::string backward = std::string(op) + "_backward";
    if constexpr (probabilities) {
        m.def(
            op,
            [op](const py::handle& x, const py::handle& y, const py::handle& weight,
                 const py::handle& reduction) {
                return binary_loss<true>(op, x, y, weight, py::none(), reduction);
            },
            arg(input), arg("y"), arg("weight") = py::none(), arg("reduction") = "mean", doc);
        m.def(
            backward.c_str(),
            [backward](const py::handle& x, const py::handle& y, const py::handle& weight,
                       const py::handle& reduction, const py::handle& grad_output) {
                return binary_loss_backward<true>(backward.c_str(), x, y, weight, py::none(),
                                                  reduction, grad_output);
            },
            arg(input), arg("y"), arg("weight") = py::none(), arg("reduction") = "mean",
            arg("grad_output") = py::none(), backward_doc);
    } else {
        m.def(
            op,
            [op](const py::handle& x, const py::handle& y, const py::handle& weight,
                 const py::handle& pos_weight, const py::handle& reduction) {
                return binary_loss<false>(op, x, y, weight, pos_weight, reduction);
            },
            arg(input), arg("y"), arg("weight") = py::none(), arg("pos_weight") = py::none(),
            arg("reduction") = "mean", doc);
        m.def(
            backward.c_str(),
            [backward](const py::handle& x, const py::handle& y, const py::handle& weight,
                       const py::handle& pos_weight, const py::handle& reduction,
                       const py::handle& grad_output) {
                return binary_loss_backward<false>(backward.c_str(), x, y, weight, pos_weight,
                                                   reduction, grad_output);
            },
            arg(input), arg("y"), arg("weight") = py::none(), arg("pos_weight") = py::none(),
            arg("reduction") = "mean", arg("grad_output") = py::none(), backward_doc);
    }
}

}  // namespace

namespace cnnbp_bindings {
void bind_nn(py::module_& m);  // nn_bindings.cpp
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "cnnbp's C++ kernels (use cnnbp.functional, which documents each function)";
    m.attr("__version__") = CNNBP_VERSION;  // the CMake project's, read from cnnbp.__version__
    m.def(
        "as_array", [](const py::handle& obj) { return as_array("as_array", "obj", obj); },
        py::arg("obj"),
        "The ndarray every op reads for obj: obj itself, or a view of its memory (buffer "
        "protocol, __array_interface__, __dlpack__) when NumPy can make one.");
    using py::arg;

    m.def(
        "set_num_threads",
        [](const py::handle& n) { cnnbp::set_num_threads(parse_int("set_num_threads", "n", n)); },
        arg("n"),
        "Use n >= 1 threads in the kernels called from this thread from now on (OpenMP's "
        "omp_set_num_threads). Results are the same for any n.");
    m.def("get_num_threads", &cnnbp::get_num_threads,
          "The number of threads the kernels may use (omp_get_max_threads; 1 without OpenMP).");

    m.def("kernel_isa", &cnnbp::kernel_isa,
          "The instruction set the kernels run with: 'avx512', 'avx2' or 'generic' (chosen "
          "from the CPU at run time; the environment variable CNNBP_ISA caps it).");
    m.def("_micro_kernel_gflops", &cnnbp::micro_kernel_gflops, arg("seconds") = 0.2,
          "GFLOP/s of the float GEMM micro-kernel on one thread, data in L1 (for benchmarks).");
    m.def("_fma_peak_gflops", &cnnbp::fma_peak_gflops, arg("seconds") = 0.2,
          "GFLOP/s of independent float FMA chains on one thread in the widest vectors the CPU "
          "has: one core's fp32 peak (for benchmarks).");
    m.def("conv2d_workspace_bytes", &conv2d_workspace_bytes, arg("x_shape"), arg("w_shape"),
          arg("stride") = 1, arg("padding") = 0, arg("dtype") = "float32", arg("dilation") = 1,
          arg("groups") = 1,
          "Bytes of scratch memory conv2d / conv2d_backward allocate for these shapes with the "
          "current thread count (0 for the direct loops of tiny problems).");

    m.def(
        "output_size",
        [](const py::handle& in, const py::handle& kernel, const py::handle& stride,
           const py::handle& padding, const py::handle& dilation, const py::handle& ceil_mode) {
            const char* op = "output_size";
            return cnnbp::output_size(
                parse_int(op, "in_size", in), parse_int(op, "kernel", kernel),
                parse_int(op, "stride", stride), parse_int(op, "padding", padding),
                parse_int(op, "dilation", dilation), parse_bool(op, "ceil_mode", ceil_mode));
        },
        arg("in_size"), arg("kernel"), arg("stride") = 1, arg("padding") = 0, arg("dilation") = 1,
        arg("ceil_mode") = false,
        "Output length of a sliding window, torch's rule: floor (or ceil, with ceil_mode) of "
        "(in + 2*padding - dilation*(kernel-1) - 1) / stride, plus 1; in ceil_mode a last "
        "window starting in the right padding is dropped.");

    m.def("conv2d", &conv2d, arg("x"), arg("w"), arg("b") = py::none(), arg("stride") = 1,
          arg("padding") = 0, arg("dilation") = 1, arg("groups") = 1,
          "y (N, K, P, Q) = conv2d(x (N, C, H, W), w (K, C/groups, R, S), b (K,) or None): "
          "cross-correlation with zero padding (an int, a pair, 'valid' or 'same'), dilation "
          "and groups, as torch.nn.functional.conv2d.");
    m.def("conv2d_backward", &conv2d_backward, arg("dy"), arg("x"), arg("w"), arg("stride") = 1,
          arg("padding") = 0, arg("dilation") = 1, arg("groups") = 1,
          "(dx, dw, db) = gradients of conv2d given dy (N, K, P, Q); db = dy summed over N, P, Q.");

    m.def("max_pool2d", &max_pool2d, arg("x"), arg("kernel_size"), arg("stride") = py::none(),
          arg("padding") = 0, arg("dilation") = 1, arg("ceil_mode") = false,
          "(y, idx) = max_pool2d(x (N, C, H, W), ...): -inf padding, window taps dilation "
          "apart, output size floored (or ceil_mode, as torch); idx "
          "int64 holds the flat position h*W+w of each maximum within its input plane.");
    m.def("max_pool2d_backward", &max_pool2d_backward, arg("dy"), arg("idx"), arg("x_shape"),
          "dx (x_shape) = dy scattered to the positions in idx, zero elsewhere.");

    def_activation<cnnbp::relu_forward<float>, cnnbp::relu_forward<double>,
                   cnnbp::relu_backward<float>, cnnbp::relu_backward<double>>(
        m, "relu", "z", "a = max(z, 0)", "dz = da where z > 0, else 0");
    def_activation<cnnbp::sigmoid_forward<float>, cnnbp::sigmoid_forward<double>,
                   cnnbp::sigmoid_backward<float>, cnnbp::sigmoid_backward<double>>(
        m, "sigmoid", "a", "a = 1 / (1 + exp(-z))",
        "dz = da * a * (1 - a), from the forward output a");
    def_activation<cnnbp::tanh_forward<float>, cnnbp::tanh_forward<double>,
                   cnnbp::tanh_backward<float>, cnnbp::tanh_backward<double>>(
        m, "tanh", "a", "a = tanh(z)", "dz = da * (1 - a * a), from the forward output a");
    def_activation<cnnbp::silu_forward<float>, cnnbp::silu_forward<double>,
                   cnnbp::silu_backward<float>, cnnbp::silu_backward<double>>(
        m, "silu", "z", "a = z * sigmoid(z) = z / (1 + exp(-z))",
        "dz = da * s * (1 + z * (1 - s)), s = sigmoid(z), from the forward input z");
    def_activations_with_options(m);
    def_softmaxes(m);
    def_avg_pool2d_dropout(m);
    def_adaptive_avg_pool2d(m);
    def_batch_norm2d(m);

    m.def("linear", &linear, arg("x"), arg("w"), arg("b") = py::none(),
          "y (*, out) = x (*, in) . w (out, in)^T + b (out,)");
    m.def("linear_backward", &linear_backward, arg("dy"), arg("x"), arg("w"),
          "(dx, dw, db) = gradients of linear given dy (*, out)");

    def_binary_loss<true>(m, "binary_cross_entropy", "a",
                          "binary cross-entropy of probabilities a against targets y "
                          "(torch's weight and reduction)",
                          "dL/da of binary_cross_entropy, times grad_output");
    def_binary_loss<false>(m, "binary_cross_entropy_with_logits", "z",
                           "binary cross-entropy of sigmoid(z) against y, computed stably "
                           "(torch's weight, pos_weight and reduction)",
                           "dL/dz of binary_cross_entropy_with_logits, times grad_output");
    m.def("cross_entropy", &cross_entropy, arg("logits"), arg("target"), arg("weight") = py::none(),
          arg("ignore_index") = -100, arg("reduction") = "mean", arg("label_smoothing") = 0.0,
          "softmax cross-entropy of logits (N, K[, d1, ...]) against class indices (N[, d1, "
          "...]) or class probabilities of the logits' shape (torch's options)");
    m.def("cross_entropy_backward", &cross_entropy_backward, arg("logits"), arg("target"),
          arg("weight") = py::none(), arg("ignore_index") = -100, arg("reduction") = "mean",
          arg("label_smoothing") = 0.0, arg("grad_output") = py::none(),
          "dL/dlogits of cross_entropy, times grad_output");

    m.def("nll_loss", &nll_loss, arg("input"), arg("target"), arg("weight") = py::none(),
          arg("ignore_index") = -100, arg("reduction") = "mean",
          "negative log-likelihood of log-probabilities input (N, K[, d1, ...]) against class "
          "indices (N[, d1, ...]) (torch's options)");
    m.def("nll_loss_backward", &nll_loss_backward, arg("input"), arg("target"),
          arg("weight") = py::none(), arg("ignore_index") = -100, arg("reduction") = "mean",
          arg("grad_output") = py::none(), "dL/dinput of nll_loss, times grad_output");

    cnnbp_bindings::bind_nn(m);  // the model objects that cnnbp.nn and cnnbp.optim wrap
}

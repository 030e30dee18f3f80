// cnnbp._core's model objects: the layers, Sequential, losses and optimizers of cnnbp/nn.hpp,
// one class per dtype ("Layer32", "SGD64", ...), which python/cnnbp/nn.py and optim.py
// wrap. Layers are made by name from the registry (make_layer), which also tells Python
// which layer classes to offer (layer_types); model files are cnnbp/model_file.hpp's. Arrays cross
// the boundary by copy (a layer keeps its own input; outputs and the trace come back as new
// arrays), except parameters and buffers, whose data and grad are NumPy views of the C++ storage.
// The GIL is released while layers run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "arrays.hpp"
#include "cnnbp/errors.hpp"
#include "cnnbp/model_file.hpp"
#include "cnnbp/nn.hpp"
#include "cnnbp/registry.hpp"

namespace cnnbp_bindings {

using namespace cnnbp::nn;
namespace json = cnnbp::json;

namespace {

template <typename T>
constexpr DType dtype_of = std::is_same_v<T, float> ? DType::f32 : DType::f64;

template <typename T>
std::string dtype_str() {
    return std::is_same_v<T, float> ? "float32" : "float64";
}

template <typename T>
std::string suffixed(const char* name) {
    return std::string(name) + (std::is_same_v<T, float> ? "32" : "64");
}

// The kernel a layer's error messages name, as the functional API's do (its declaration's
// op), or its type.
template <typename T>
std::string op_of(const Layer<T>& layer) {
    if (const Config* arguments = layer.arguments()) return find_layer_type(arguments->type())->op;
    return layer.type();
}

// A Python value as JSON: None, bool, int, float, str, list/tuple, dict (NumPy scalars
// too); anything else is a TypeError naming the argument.
json::Value to_json(const std::string& op, const std::string& name, const py::handle& obj) {
    if (obj.is_none()) return nullptr;
    if (py::isinstance<py::bool_>(obj) ||
        py::isinstance(obj, py::module_::import("numpy").attr("bool_")))
        return py::cast<bool>(obj);
    if (py::isinstance<py::int_>(obj) ||
        py::isinstance(obj, py::module_::import("numpy").attr("integer"))) {
        py::int_ i(py::reinterpret_borrow<py::object>(obj));
        try {
            return py::cast<int64_t>(i);
        } catch (const py::cast_error&) {
            return json::Value::Big{py::cast<std::string>(py::str(i))};
        }
    }
    if (py::isinstance<py::float_>(obj) ||
        py::isinstance(obj, py::module_::import("numpy").attr("floating")))
        return py::cast<double>(obj);
    if (py::isinstance<py::str>(obj)) return py::cast<std::string>(obj);
    if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
        json::Array out;
        for (py::handle item : obj) out.push_back(to_json(op, name, item));
        return out;
    }
    if (py::isinstance<py::dict>(obj)) {
        json::Object out;
        for (auto [k, v] : py::reinterpret_borrow<py::dict>(obj))
            out.emplace_back(py::cast<std::string>(py::str(k)), to_json(op, name, v));
        return out;
    }
    throw py::type_error("[" + op + "] " + name +
                         ": expected an int, a float, a bool or a "
                         "list of them, got " +
                         py::cast<std::string>(py::repr(obj)));
}

py::object to_python(const json::Value& v) {
    if (v.is_null()) return py::none();
    if (const bool* b = v.get<bool>()) return py::bool_(*b);
    if (const int64_t* i = v.get<int64_t>()) return py::int_(*i);
    if (const double* d = v.get<double>()) return py::float_(*d);
    if (const std::string* s = v.get<std::string>()) return py::str(*s);
    if (const json::Value::Big* big = v.get<json::Value::Big>())
        return py::module_::import("builtins").attr("int")(big->text);
    if (const json::Array* a = v.get<json::Array>()) {
        py::list out;
        for (const auto& item : *a) out.append(to_python(item));
        return std::move(out);
    }
    py::dict out;
    for (const auto& [key, value] : *v.get<json::Object>()) out[py::str(key)] = to_python(value);
    return std::move(out);
}

// dst = a C-contiguous copy of obj, which must be a float array of dtype T.
template <typename T>
void fill(Tensor<T>& dst, const py::array& arr) {
    auto c = contiguous<T>(arr);
    dst.shape = shape_of(c);
    dst.data.assign(c.data(), c.data() + c.size());  // reuses the storage
}

// A layer's input: a float array of the layer's dtype. A weighted layer states a mismatch as
// the functional API does, from the weight's side.
template <typename T>
void fill_input(Tensor<T>& dst, const std::string& op, bool weighted, const py::handle& obj,
                const char* name = "input") {
    if (is_plain_array<T>(obj)) {  // the common case, read off the header
        const auto arr = py::reinterpret_borrow<py::array>(obj);
        dst.shape.assign(arr.shape(), arr.shape() + arr.ndim());
        const T* data = static_cast<const T*>(arr.data());
        dst.data.assign(data, data + cnnbp::numel(dst.shape));
        return;
    }
    py::array arr = as_array(op.c_str(), name, obj);
    const DType got = float_dtype(op.c_str(), name, arr);
    if (got != dtype_of<T>) {
        if (weighted)
            throw py::type_error("[" + op + "] weight: expected " + dtype_name(arr) +
                                 " like the first array argument, got " + dtype_str<T>());
        throw py::type_error("[" + op + "] " + name + ": expected " + dtype_str<T>() + ", got " +
                             dtype_name(arr));
    }
    fill(dst, arr);
}

// dst = obj, an argument that must have the dtype T of the call's first array (the loss's
// target beside its input), reported as the functional API reports it.
template <typename T>
void fill_like_first(Tensor<T>& dst, const std::string& op, const char* name,
                     const py::handle& obj) {
    if (is_plain_array<T>(obj)) return fill_input(dst, op, false, obj, name);
    py::array arr = as_array(op.c_str(), name, obj);
    check_dtype(op.c_str(), name, arr, dtype_of<T>);
    fill(dst, arr);
}

// A new array holding a copy of t.
template <typename T>
py::array to_numpy(const Tensor<T>& t) {
    auto out = empty_like_shape<T>(t.shape);
    if (!t.data.empty()) std::memcpy(out.mutable_data(), t.data.data(), t.data.size() * sizeof(T));
    return out;
}

// A copy, or None for a tensor that was never written (a trace entry before its pass).
template <typename T>
py::object to_numpy_or_none(const Tensor<T>* t) {
    if (!t || t->shape.empty()) return py::none();
    return to_numpy(*t);
}

// A writable NumPy view of t's storage that keeps `owner` alive.
template <typename T>
py::array view(Tensor<T>& t, const py::handle& owner) {
    std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
    return py::array_t<T>(shape, t.data.data(), owner);
}

// Whether the layer has a weight, which then names a dtype mismatch (see fill_input).
template <typename T>
bool is_weighted(Layer<T>& layer) {
    return dynamic_cast<WeightedLayer<T>*>(&layer) != nullptr;
}

template <typename T>
py::array layer_forward(Layer<T>& layer, const py::handle& x) {
    InUse::Hold held(layer.in_use(), layer);  // before its kept input is overwritten
    fill_input(layer.kept_input(), op_of(layer), is_weighted(layer), x);
    const Tensor<T>* out;
    {
        py::gil_scoped_release release;
        out = &layer.forward(layer.kept_input());
    }
    return to_numpy(*out);
}

template <typename T>
py::array layer_backward(Layer<T>& layer, const py::handle& dy) {
    InUse::Hold held(layer.in_use(), layer);
    fill_input(layer.kept_grad_output(), op_of(layer) + "_backward", false, dy, "doutput");
    const Tensor<T>* dx;
    {
        py::gil_scoped_release release;
        dx = &layer.backward(layer.kept_grad_output());
    }
    return to_numpy(*dx);
}

// A module written in Python, run as a layer of a C++ Sequential: its forward and backward
// are called with the GIL held, on copies of the tensors.
template <typename T>
class PythonLayer : public Layer<T> {
 public:
    explicit PythonLayer(py::object module) : module_(std::move(module)) {}

    std::string type() const override {
        py::gil_scoped_acquire gil;
        return py::cast<std::string>(py::type::of(module_).attr("__name__"));
    }

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override {
        py::gil_scoped_acquire gil;
        this->input_ = &input;
        py::object out = module_.attr("forward")(to_numpy(input));
        fill_input(this->output_, type(), false, out, "output");
        return this->output_;
    }

    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override {
        py::gil_scoped_acquire gil;
        this->grad_output_ = &grad_output;
        py::object dx = module_.attr("backward")(to_numpy(grad_output));
        fill_input(this->grad_input_, type() + "_backward", false, dx, "grad_input");
        return this->grad_input_;
    }

 public:
    // the module's own parameters, so zero_grad and the optimizers reach them
    std::vector<std::pair<std::string, Parameter<T>*>> named_parameters() override {
        py::gil_scoped_acquire gil;
        std::vector<std::pair<std::string, Parameter<T>*>> out;
        for (py::handle pair : module_.attr("named_parameters")()) {
            auto named = py::reinterpret_borrow<py::tuple>(pair);
            py::object impl = named[1].attr("_impl");
            if (!py::isinstance<Parameter<T>>(impl))
                throw py::type_error("[Sequential] " + type() + "." +
                                     py::cast<std::string>(named[0]) + ": expected a " +
                                     dtype_str<T>() + " parameter like the model's");
            out.emplace_back(py::cast<std::string>(named[0]), impl.cast<Parameter<T>*>());
        }
        return out;
    }

 private:
    py::object module_;
};

// A loss's target: probabilities of the input's dtype for the BCE losses, class indices
// (int64) or class probabilities (floats) for cross-entropy, checked as the functional API
// checks them.
template <typename T>
struct Target {
    Tensor<T> values;
    Tensor<int64_t> labels;
    bool is_labels = false;

    // input_shape: the loss's input when known (a train step's is not, before its forward)
    void fill(Loss<T>& loss, const py::handle& obj, const Shape* input_shape = nullptr) {
        is_labels = loss.takes_class_indices();
        if (is_labels && py::isinstance<py::array>(obj)) {
            // cross-entropy's class probabilities: floats of the input's shape (as
            // F.cross_entropy), or of at least 2 dims when that is not known yet
            auto array = py::reinterpret_borrow<py::array>(obj);
            if (array.dtype().kind() == 'f')
                is_labels = input_shape ? shape_of(array) != *input_shape : array.ndim() < 2;
        }
        if (!is_labels) return fill_like_first(values, loss.op(), "target", obj);
        auto array = as_int64(loss.op(), "labels", obj);
        labels.shape = shape_of(array);
        labels.data.assign(array.data(), array.data() + array.size());
    }
    double forward(Loss<T>& loss, const Tensor<T>& input) {
        if (is_labels) return loss.forward(input, labels);
        return loss.forward(input, values);
    }
};

// The reduced loss as a float, or for reduction 'none' the per-element losses (a copy).
template <typename T>
py::object loss_value(const Loss<T>& loss) {
    if (loss.reduction() == cnnbp::Reduction::None) return to_numpy(loss.losses());
    return py::float_(loss.value());
}

template <typename T>
py::object loss_forward(Loss<T>& loss, const py::handle& input, const py::handle& target) {
    static thread_local Tensor<T> input_copy;  // the loss keeps its own copies
    static thread_local Target<T> target_copy;
    fill_like_first(input_copy, loss.op(), "input", input);
    target_copy.fill(loss, target, &input_copy.shape);
    {
        py::gil_scoped_release release;
        target_copy.forward(loss, input_copy);
    }
    return loss_value(loss);
}

// dL/d input of the loss's last call: grad_output None (1) or a number for a reduced loss,
// an array of the losses' shape for reduction 'none'.
template <typename T>
py::array loss_backward(Loss<T>& loss, const py::handle& grad_output) {
    const Tensor<T>* grad;
    const bool none = loss.reduction() == cnnbp::Reduction::None;
    if (grad_output.is_none() && !none) {
        py::gil_scoped_release release;
        grad = &loss.backward(1.0);
    } else if (!none && !py::isinstance<py::array>(grad_output)) {
        const double value = PyFloat_AsDouble(grad_output.ptr());
        if (value == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            throw std::invalid_argument(std::string("[") + loss.op() +
                                        "_backward] grad_output: expected a number (the loss "
                                        "is reduced), got " +
                                        std::string(py::repr(grad_output)));
        }
        py::gil_scoped_release release;
        grad = &loss.backward(value);
    } else {
        if (grad_output.is_none()) return to_numpy(loss.backward(1.0));  // refused: 'none'
        static thread_local Tensor<T> g;
        const std::string op = std::string(loss.op()) + "_backward";
        fill_like_first(g, op, "grad_output", grad_output);
        py::gil_scoped_release release;
        grad = &loss.backward(g);
    }
    return to_numpy(*grad);
}

// Steps on inputs smaller than this keep the GIL: releasing it costs more than they do.
constexpr int64_t kReleaseGilValues = int64_t(1) << 12;

// A training step with its model, loss and optimizer bound once, so that each call passes
// only the batch: the path of Sequential.train_step in Python.
template <typename T>
struct TrainStep {
    std::shared_ptr<Sequential<T>> model;
    std::shared_ptr<Loss<T>> loss;
    std::shared_ptr<Optimizer<T>> optimizer;
    Target<T> target;  // the loss keeps its own copy; this is the conversion's storage

    double operator()(const py::handle& x, const py::handle& y) {
        if (loss->reduction() == cnnbp::Reduction::None)  // before anything is touched
            throw std::invalid_argument(
                "[train_step] loss: expected reduction 'mean' or 'sum' "
                "(a scalar loss to step on), got " +
                loss->type() + " with reduction 'none'");
        // held before anything is touched
        InUse::Hold model_held(model->in_use(), *model), loss_held(loss->in_use(), *loss),
            optimizer_held(optimizer->in_use(), *optimizer);
        fill_input(model->kept_input(), "Sequential", false, x);
        target.fill(*loss, y);
        const bool release = model->kept_input().size() >= kReleaseGilValues;
        std::optional<py::gil_scoped_release> released;
        if (release) released.emplace();
        if (target.is_labels)
            return train_step(*model, model->kept_input(), target.labels, *loss, *optimizer);
        return train_step(*model, model->kept_input(), target.values, *loss, *optimizer);
    }
};

// An optimizer's per-parameter buffer as an array shaped like its parameter (a copy), or
// None while it is empty.
template <typename T>
py::object buffer_array(Optimizer<T>& o, size_t i, const std::vector<T>& buffer) {
    if (buffer.empty()) return py::none();
    auto out = empty_like_shape<T>(o.parameters().at(i)->value.shape);
    std::copy(buffer.begin(), buffer.end(), out.mutable_data());
    return std::move(out);
}

// buffer = a copy of `values` (None: empty), which must have the parameter's shape.
template <typename T>
void set_buffer(Optimizer<T>& o, size_t i, std::vector<T>& buffer, const char* name,
                const py::handle& values) {
    if (values.is_none()) {
        buffer.clear();
        return;
    }
    const Shape& shape = o.parameters().at(i)->value.shape;
    Tensor<T> t;
    fill_input(t, o.type() + ".load_state_dict", false, values, name);
    if (t.shape != shape)
        throw py::value_error("[" + o.type() + ".load_state_dict] " + name + ": expected shape " +
                              cnnbp::shape_str(shape) + ", got shape " + cnnbp::shape_str(t.shape));
    buffer = std::move(t.data);
}

template <typename T>
std::vector<Parameter<T>*> parameter_pointers(const py::list& params) {
    std::vector<Parameter<T>*> out;
    for (py::handle p : params) out.push_back(p.cast<Parameter<T>*>());
    return out;
}

template <typename T>
py::list named_parameters(const py::object& self) {
    py::list out;
    for (auto& [name, p] : self.cast<Layer<T>&>().named_parameters())
        out.append(
            py::make_tuple(name, py::cast(p, py::return_value_policy::reference_internal, self)));
    return out;
}

// (name, array) per buffer: writable NumPy views of the C++ storage (a counter: int64, 0-d)
template <typename T>
py::list named_buffers(const py::object& self) {
    py::list out;
    for (auto& [name, b] : self.cast<Layer<T>&>().named_buffers())
        out.append(py::make_tuple(name, b.values ? view(*b.values, self) : view(*b.counts, self)));
    return out;
}

// The flat buffer unpack_* reads: a 1-dim array of T (a view when it is one already).
template <typename T>
py::array_t<T, py::array::c_style> flat_argument(const char* op, const py::handle& obj) {
    py::array arr = as_array(op, "flat", obj);
    if (float_dtype(op, "flat", arr) != dtype_of<T>)
        throw py::type_error(std::string("[") + op + "] flat: expected " + dtype_str<T>() +
                             ", got " + dtype_name(arr));
    if (arr.ndim() != 1)
        throw std::invalid_argument(std::string("[") + op + "] flat: expected 1 dim, got shape " +
                                    cnnbp::shape_str(shape_of(arr)));
    return contiguous<T>(arr);
}

// pack_*(model) -> a new flat array, or into `out` (a writable 1-dim array of T)
template <typename T, void (*pack)(T*, int64_t, Layer<T>&), int64_t (*size)(Layer<T>&)>
py::object flat_pack(Layer<T>& l, const py::object& out, const char* op) {
    if (out.is_none()) {
        auto flat = empty_like_shape<T>(Shape{size(l)});
        pack(flat.mutable_data(), flat.size(), l);
        return std::move(flat);
    }
    if (!is_plain_array<T>(out) || py::reinterpret_borrow<py::array>(out).ndim() != 1 ||
        !py::reinterpret_borrow<py::array>(out).writeable())
        throw py::type_error(std::string("[") + op + "] out: expected a writable, contiguous " +
                             "1-dim array of " + dtype_str<T>() + ", got " + type_name(out));
    auto flat = py::reinterpret_borrow<py::array>(out);
    pack(static_cast<T*>(flat.mutable_data()), flat.size(), l);
    return out;
}

template <typename T, void (*unpack)(Layer<T>&, const T*, int64_t)>
void flat_unpack(Layer<T>& l, const py::handle& flat, const char* op) {
    auto arr = flat_argument<T>(op, flat);
    unpack(l, arr.data(), arr.size());
}

// Parameter, Layer (every declared type through make_layer), PythonLayer
template <typename T>
void bind_layers(py::module_& m) {
    using P = Parameter<T>;
    py::class_<P>(m, suffixed<T>("Parameter").c_str())
        .def(py::init([](const py::handle& data) {
            auto p = std::make_unique<P>();
            fill_input(p->value, "Parameter", false, data, "data");
            return p;
        }))
        .def_property_readonly("data",
                               [](py::object self) { return view(self.cast<P&>().value, self); })
        .def_property_readonly("grad",
                               [](py::object self) -> py::object {
                                   P& p = self.cast<P&>();
                                   if (!p.grad_set) return py::none();
                                   return view(p.grad, self);
                               })
        // the gradient's storage, shaped like data, marked set: the caller fills it
        .def("grad_storage",
             [](py::object self) {
                 P& p = self.cast<P&>();
                 p.grad.resize(p.value.shape);
                 p.grad_set = true;
                 return view(p.grad, self);
             })
        .def("clear_grad", &P::clear_grad);

    using L = Layer<T>;
    py::class_<L, std::shared_ptr<L>>(m, suffixed<T>("Layer").c_str())
        .def("forward", &layer_forward<T>)
        .def("backward", &layer_backward<T>)
        .def("input", [](L& l) { return to_numpy_or_none(l.input()); })
        .def("output", [](L& l) { return to_numpy_or_none(&l.output()); })
        .def("grad_output", [](L& l) { return to_numpy_or_none(l.grad_output()); })
        .def("grad_input", [](L& l) { return to_numpy_or_none(&l.grad_input()); })
        .def("type", &L::type)
        .def("train", &L::train)
        .def("is_training", &L::is_training)
        .def("named_parameters", &named_parameters<T>)
        .def("named_buffers", &named_buffers<T>)
        // the flat buffer of the parameters, gradients or floating buffers (nn.hpp's pack_*)
        .def("flat_size", [](L& l) { return flat_size(l); })
        .def("flat_buffer_size", [](L& l) { return flat_buffer_size(l); })
        .def(
            "pack_gradients",
            [](L& l, const py::object& out) {
                return flat_pack<T, pack_gradients<T>, flat_size<T>>(l, out, "pack_gradients");
            },
            py::arg("out") = py::none())
        .def(
            "pack_parameters",
            [](L& l, const py::object& out) {
                return flat_pack<T, pack_parameters<T>, flat_size<T>>(l, out, "pack_parameters");
            },
            py::arg("out") = py::none())
        .def(
            "pack_buffers",
            [](L& l, const py::object& out) {
                return flat_pack<T, pack_buffers<T>, flat_buffer_size<T>>(l, out, "pack_buffers");
            },
            py::arg("out") = py::none())
        .def("unpack_gradients",
             [](L& l, const py::handle& flat) {
                 flat_unpack<T, unpack_gradients<T>>(l, flat, "unpack_gradients");
             })
        .def("unpack_parameters",
             [](L& l, const py::handle& flat) {
                 flat_unpack<T, unpack_parameters<T>>(l, flat, "unpack_parameters");
             })
        .def("unpack_buffers",
             [](L& l, const py::handle& flat) {
                 flat_unpack<T, unpack_buffers<T>>(l, flat, "unpack_buffers");
             })
        // every argument the layer was built from (None for undeclared types)
        .def("arguments",
             [](L& l) -> py::object {
                 if (!l.arguments()) return py::none();
                 return to_python(l.arguments()->values());
             })
        .def("config", [](L& l) { return to_python(l.config()); })
        // name -> array (a copy) or None, of what the trace holds beyond the tensors
        .def("trace_extras", [](L& l) {
            py::dict out;
            for (const TraceExtra& extra : l.trace_extras()) {
                if (extra.indices) {
                    auto a = empty_like_shape<int64_t>(extra.shape);
                    std::copy(extra.indices, extra.indices + a.size(), a.mutable_data());
                    out[py::str(extra.name)] = a;
                } else if (extra.mask) {
                    auto a = empty_like_shape<bool>(extra.shape);
                    std::copy(extra.mask, extra.mask + a.size(), a.mutable_data());
                    out[py::str(extra.name)] = a;
                } else {
                    out[py::str(extra.name)] = py::none();
                }
            }
            return out;
        });

    // a layer of a declared type, by name, from Python's (named) arguments
    m.def(suffixed<T>("make_layer").c_str(), [](const std::string& type, const py::dict& named) {
        json::Object arguments;
        for (auto [key, value] : named) {
            const std::string name = py::cast<std::string>(key);
            arguments.emplace_back(name, to_json(type, name, value));
        }
        return make_layer<T>(type, {}, arguments);
    });
    py::class_<PythonLayer<T>, L, std::shared_ptr<PythonLayer<T>>>(
        m, suffixed<T>("PythonLayer").c_str())
        .def(py::init<py::object>());
}

// Sequential with its model files, and the bound training step
template <typename T>
void bind_models(py::module_& m) {
    using L = Layer<T>;
    py::class_<Sequential<T>, L, std::shared_ptr<Sequential<T>>>(m,
                                                                 suffixed<T>("Sequential").c_str())
        .def(py::init<>())
        .def("add", [](Sequential<T>& s, std::shared_ptr<L> layer) { s.add(std::move(layer)); })
        .def("zero_grad", &Sequential<T>::zero_grad)
        .def("layers",
             [](Sequential<T>& s) {
                 std::vector<std::shared_ptr<L>> out;
                 for (size_t i = 0; i < s.size(); ++i) out.push_back(s.layer(i));
                 return out;
             })
        // the model file (cnnbp/model_file.hpp), with an optimizer's state when given
        .def(
            "save",
            [](Sequential<T>& s, const std::string& path, std::shared_ptr<Optimizer<T>> opt) {
                py::gil_scoped_release release;
                save(s, path, opt.get());
            },
            py::arg("path"), py::arg("optimizer") = nullptr);
    py::class_<Residual<T>, L, std::shared_ptr<Residual<T>>>(m, suffixed<T>("Residual").c_str())
        .def(py::init<std::shared_ptr<L>, std::shared_ptr<L>>(), py::arg("block"),
             py::arg("shortcut") = nullptr)
        .def("zero_grad", &Residual<T>::zero_grad)
        .def("block", &Residual<T>::block)
        .def("shortcut", &Residual<T>::shortcut);
    py::class_<Concat<T>, L, std::shared_ptr<Concat<T>>>(m, suffixed<T>("Concat").c_str())
        .def(py::init<std::vector<std::shared_ptr<L>>>())
        .def("zero_grad", &Concat<T>::zero_grad)
        .def("branches", [](Concat<T>& c) {
            std::vector<std::shared_ptr<L>> out;
            for (size_t i = 0; i < c.size(); ++i) out.push_back(c.branch(i));
            return out;
        });
    // (Sequential, optimizer or None) from a model file of this dtype
    m.def(suffixed<T>("load_checkpoint").c_str(), [](const std::string& path) {
        Checkpoint<T> c = [&] {
            py::gil_scoped_release release;
            return load_checkpoint<T>(path);
        }();
        return py::make_tuple(std::make_shared<Sequential<T>>(std::move(c.model)), c.optimizer);
    });
    m.def(suffixed<T>("load_model").c_str(), [](const std::string& path) {
        py::gil_scoped_release release;
        return std::make_shared<Sequential<T>>(load<T>(path));
    });
    py::class_<TrainStep<T>>(m, suffixed<T>("TrainStep").c_str())
        .def(py::init([](std::shared_ptr<Sequential<T>> model, std::shared_ptr<Loss<T>> loss,
                         std::shared_ptr<Optimizer<T>> optimizer) {
            return TrainStep<T>{std::move(model), std::move(loss), std::move(optimizer), {}};
        }))
        .def("__call__", &TrainStep<T>::operator());
}

// A loss option's weight: None, or any float array (converted to double, then to the
// loss's dtype once).
std::optional<Tensor<double>> loss_weight(const char* op, const char* name, const py::handle& obj) {
    if (obj.is_none()) return std::nullopt;
    py::array array = as_array(op, name, obj);
    float_dtype(op, name, array);
    auto values = py::array_t<double, py::array::c_style | py::array::forcecast>(array);
    return Tensor<double>(shape_of(values),
                          std::vector<double>(values.data(), values.data() + values.size()));
}

template <typename T>
void bind_losses(py::module_& m) {
    using Lo = Loss<T>;
    py::class_<Lo, std::shared_ptr<Lo>>(m, suffixed<T>("Loss").c_str())
        .def("forward", &loss_forward<T>)
        .def("backward", &loss_backward<T>, py::arg("grad_output") = py::none())
        .def("has_run", &Lo::has_run)
        .def("input", [](Lo& l) { return to_numpy_or_none(l.has_run() ? &l.input() : nullptr); })
        .def("target",
             [](Lo& l) -> py::object {
                 if (!l.has_run()) return py::none();
                 if (l.target_is_labels()) {
                     auto out = empty_like_shape<int64_t>(l.labels().shape);
                     std::copy(l.labels().data.begin(), l.labels().data.end(), out.mutable_data());
                     return std::move(out);
                 }
                 return to_numpy(l.target());
             })
        .def("value", [](Lo& l) { return loss_value(l); })
        .def("reduction", [](Lo& l) { return std::string(cnnbp::reduction_str(l.reduction())); })
        .def("grad_input", [](Lo& l) { return to_numpy_or_none(&l.grad_input()); })
        .def("type", &Lo::type);
    using py::arg;
    py::class_<BCELoss<T>, Lo, std::shared_ptr<BCELoss<T>>>(m, suffixed<T>("BCELoss").c_str())
        .def(py::init([](const py::handle& weight, const py::handle& reduction) {
                 const char* op = "BCELoss";
                 return std::make_shared<BCELoss<T>>(BCELossOptions()
                                                         .weight(loss_weight(op, "weight", weight))
                                                         .reduction(reduction_arg(op, reduction)));
             }),
             arg("weight") = py::none(), arg("reduction") = "mean");
    py::class_<BCEWithLogitsLoss<T>, Lo, std::shared_ptr<BCEWithLogitsLoss<T>>>(
        m, suffixed<T>("BCEWithLogitsLoss").c_str())
        .def(py::init([](const py::handle& weight, const py::handle& reduction,
                         const py::handle& pos_weight) {
                 const char* op = "BCEWithLogitsLoss";
                 return std::make_shared<BCEWithLogitsLoss<T>>(
                     BCEWithLogitsLossOptions()
                         .weight(loss_weight(op, "weight", weight))
                         .pos_weight(loss_weight(op, "pos_weight", pos_weight))
                         .reduction(reduction_arg(op, reduction)));
             }),
             arg("weight") = py::none(), arg("reduction") = "mean", arg("pos_weight") = py::none());
    py::class_<CrossEntropyLoss<T>, Lo, std::shared_ptr<CrossEntropyLoss<T>>>(
        m, suffixed<T>("CrossEntropyLoss").c_str())
        .def(py::init([](const py::handle& weight, int64_t ignore_index,
                         const py::handle& reduction, double label_smoothing) {
                 const char* op = "CrossEntropyLoss";
                 return std::make_shared<CrossEntropyLoss<T>>(
                     CrossEntropyLossOptions()
                         .weight(loss_weight(op, "weight", weight))
                         .ignore_index(ignore_index)
                         .reduction(reduction_arg(op, reduction))
                         .label_smoothing(label_smoothing));
             }),
             arg("weight") = py::none(), arg("ignore_index") = -100, arg("reduction") = "mean",
             arg("label_smoothing") = 0.0);
    py::class_<NLLLoss<T>, Lo, std::shared_ptr<NLLLoss<T>>>(m, suffixed<T>("NLLLoss").c_str())
        .def(py::init([](const py::handle& weight, int64_t ignore_index,
                         const py::handle& reduction) {
                 const char* op = "NLLLoss";
                 return std::make_shared<NLLLoss<T>>(NLLLossOptions()
                                                         .weight(loss_weight(op, "weight", weight))
                                                         .ignore_index(ignore_index)
                                                         .reduction(reduction_arg(op, reduction)));
             }),
             arg("weight") = py::none(), arg("ignore_index") = -100, arg("reduction") = "mean");
}

template <typename T>
void bind_optimizers(py::module_& m) {
    using O = Optimizer<T>;
    using py::arg;
    py::class_<O, std::shared_ptr<O>>(m, suffixed<T>("Optimizer").c_str())
        .def("step",
             [](O& o) {
                 py::gil_scoped_release release;
                 o.step();
             })
        .def("zero_grad", &O::zero_grad)
        .def("type", &O::type)
        .def("settings", [](O& o) { return to_python(o.settings()); })
        .def_property("lr", &O::lr, &O::set_lr);
    // The optimizer keeps the list of parameters (and so the parameters) alive.
    py::class_<SGD<T>, O, std::shared_ptr<SGD<T>>>(m, suffixed<T>("SGD").c_str())
        .def(py::init([](const py::list& params, double lr, double momentum, double weight_decay,
                         double dampening, bool nesterov) {
                 return std::make_shared<SGD<T>>(parameter_pointers<T>(params), lr, momentum,
                                                 weight_decay, dampening, nesterov);
             }),
             py::keep_alive<1, 2>(), arg("params"), arg("lr"), arg("momentum"), arg("weight_decay"),
             arg("dampening"), arg("nesterov"))
        .def("momentum_buffer",
             [](SGD<T>& o, size_t i) { return buffer_array(o, i, o.momentum_buffers().at(i)); })
        .def("set_momentum_buffer", [](SGD<T>& o, size_t i, const py::handle& values) {
            set_buffer(o, i, o.momentum_buffers().at(i), "momentum_buffer", values);
        });
    py::class_<Adam<T>, O, std::shared_ptr<Adam<T>>>(m, suffixed<T>("Adam").c_str())
        .def(py::init([](const py::list& params, double lr, double beta1, double beta2, double eps,
                         double weight_decay) {
                 return std::make_shared<Adam<T>>(parameter_pointers<T>(params), lr, beta1, beta2,
                                                  eps, weight_decay);
             }),
             py::keep_alive<1, 2>(), arg("params"), arg("lr"), arg("beta1"), arg("beta2"),
             arg("eps"), arg("weight_decay"))
        // (step, exp_avg, exp_avg_sq) of parameter i, torch's names; None before its first step
        .def("moments",
             [](Adam<T>& o, size_t i) -> py::object {
                 if (o.steps().at(i) == 0) return py::none();
                 return py::make_tuple(o.steps()[i], buffer_array(o, i, o.first_moments()[i]),
                                       buffer_array(o, i, o.second_moments()[i]));
             })
        .def("set_moments", [](Adam<T>& o, size_t i, int64_t step, const py::handle& first,
                               const py::handle& second) {
            if (step < 0)
                throw py::value_error("[" + o.type() +
                                      ".load_state_dict] step: expected >= 0, "
                                      "got " +
                                      std::to_string(step));
            if (step > 0 && (first.is_none() || second.is_none()))
                throw py::value_error("[" + o.type() +
                                      ".load_state_dict] exp_avg: expected "
                                      "both moments for a step > 0");
            std::vector<T> m, v;  // checked before anything changes
            set_buffer(o, i, m, "exp_avg", step ? first : py::none());
            set_buffer(o, i, v, "exp_avg_sq", step ? second : py::none());
            o.steps().at(i) = step;
            o.first_moments()[i] = std::move(m);
            o.second_moments()[i] = std::move(v);
        });
    py::class_<AdamW<T>, Adam<T>, std::shared_ptr<AdamW<T>>>(m, suffixed<T>("AdamW").c_str())
        .def(py::init([](const py::list& params, double lr, double beta1, double beta2, double eps,
                         double weight_decay) {
                 return std::make_shared<AdamW<T>>(parameter_pointers<T>(params), lr, beta1, beta2,
                                                   eps, weight_decay);
             }),
             py::keep_alive<1, 2>(), arg("params"), arg("lr"), arg("beta1"), arg("beta2"),
             arg("eps"), arg("weight_decay"));
}

template <typename T>
void bind_dtype(py::module_& m) {
    bind_layers<T>(m);
    bind_losses<T>(m);
    bind_optimizers<T>(m);
    bind_models<T>(m);
}

}  // namespace

void bind_nn(py::module_& m) {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const cnnbp::argument_type_error& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        } catch (const cnnbp::io_error& e) {
            PyErr_SetString(PyExc_OSError, e.what());
        }
    });
    bind_dtype<float>(m);
    bind_dtype<double>(m);
    m.def("manual_seed", &manual_seed, py::arg("seed"),
          "Seed the generator that initializes new layers' weights and Dropout's seeds.");
    m.def("grad_enabled", &grad_enabled,
          "Whether forwards on this thread keep what a backward needs (False under no_grad).");
    m.def("set_grad_enabled", &set_grad_enabled, py::arg("enabled"));
    m.def("model_file_dtype", &model_file_dtype, py::arg("path"));
    // the declared layer types, for the Python classes: name, doc, fields, ...
    m.def("layer_types", [] {
        py::list out;
        for (const LayerType* t : layer_types()) {
            py::list fields;
            for (const Field& f : t->fields)
                fields.append(py::dict(
                    py::arg("name") = f.name, py::arg("default") = to_python(f.default_value),
                    py::arg("required") =
                        f.default_value.is_null() && f.default_from.empty() && !takes_null(f.kind),
                    py::arg("saved") = f.saved));
            out.append(py::dict(py::arg("name") = t->name, py::arg("doc") = t->doc,
                                py::arg("op") = t->op, py::arg("fields") = fields,
                                py::arg("has_parameters") = t->parameter_count != nullptr,
                                py::arg("trace_extras") = t->trace_extras));
        }
        return out;
    });
}

}  // namespace cnnbp_bindings

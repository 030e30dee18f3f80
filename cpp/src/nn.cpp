// Layers, Sequential, losses and optimizers over the kernels (see cnnbp/nn.hpp).
#include "cnnbp/nn.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "cnnbp/activation.hpp"
#include "cnnbp/adaptive_pool2d.hpp"
#include "cnnbp/batch_norm2d.hpp"
#include "cnnbp/conv2d.hpp"
#include "cnnbp/dropout.hpp"
#include "cnnbp/errors.hpp"
#include "cnnbp/linear.hpp"
#include "cnnbp/loss.hpp"
#include "cnnbp/optim.hpp"
#include "cnnbp/pool2d.hpp"
#include "parallel.hpp"

namespace cnnbp::nn {

namespace {

std::mt19937_64& generator() {
    static std::mt19937_64 engine{std::random_device{}()};
    return engine;
}

// torch's default for conv and linear: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), +).
// The uniform draw is written out (53 random bits scaled), not left to a library's
// distribution, so that a seed gives the same weights on every platform.
template <typename T>
Tensor<T> kaiming_uniform(Shape shape, int64_t fan_in) {
    const double bound = 1.0 / std::sqrt(double(fan_in));
    Tensor<T> t(std::move(shape));
    for (T& v : t.data) {
        const double unit = double(generator()() >> 11) * 0x1.0p-53;  // [0, 1)
        v = T(bound * (2.0 * unit - 1.0));
    }
    return t;
}

// The checked arguments of the declared layer `type`, given positionally.
Config arguments_of(const char* type, json::Array positional) {
    return find_layer_type(type)->parse(positional, {});
}

// grad (+)= delta: the first backward sets the gradient, later ones add to it.
template <typename T>
void accumulate(Parameter<T>& p, const Tensor<T>& delta) {
    if (!p.grad_set) {
        p.grad.shape = delta.shape;
        p.grad.data.assign(delta.data.begin(), delta.data.end());  // reuses the storage
        p.grad_set = true;
        return;
    }
    for (size_t i = 0; i < delta.data.size(); ++i) p.grad.data[i] += delta.data[i];
}

template <typename T>
const Tensor<T>& require_forward(const Tensor<T>* input, const char* op) {
    if (!input) throw std::logic_error(std::string("[") + op + "] backward called before forward");
    return *input;
}

// a container's child by position: std::out_of_range (IndexError in Python) past the end
void check_index(const char* type, size_t i, size_t size) {
    if (i >= size)
        throw std::out_of_range(std::string("[") + type + "] index: expected < " +
                                std::to_string(size) + ", got " + std::to_string(i));
}

}  // namespace

void manual_seed(uint64_t seed) { generator().seed(seed); }

namespace {
thread_local bool grad_mode = true;

// The storage recycled on this thread by the forward under way without gradients: the
// outermost container's spare_outputs_, most recently freed last; null outside one.
template <typename T>
std::vector<std::vector<T>>*& active_spares() {
    static thread_local std::vector<std::vector<T>>* spares = nullptr;
    return spares;
}

// Spares kept beyond this are freed, the coldest first. A pass takes back as many as it has
// recycled outputs alive at once: a residual block's input, its branches' outputs and
// their sum, or one per branch of a Concat and the concatenation.
constexpr size_t kMaxSpareOutputs = 8;
// Outputs of at least this many bytes are recycled (a core's share of a typical L2 cache).
constexpr size_t kMinRecycledBytes = size_t(1) << 20;
}  // namespace

bool grad_enabled() { return grad_mode; }
void set_grad_enabled(bool enabled) { grad_mode = enabled; }
NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }

// While the outermost container's forward without gradients runs, its spares are the
// thread's; nested containers find them active and leave them.
template <typename T>
class Container<T>::Recycling {
 public:
    explicit Recycling(std::vector<std::vector<T>>& spares) {
        if (!active_spares<T>()) active_spares<T>() = &spares, outermost_ = true;
    }
    ~Recycling() {
        if (outermost_) active_spares<T>() = nullptr;
    }
    Recycling(const Recycling&) = delete;
    Recycling& operator=(const Recycling&) = delete;

 private:
    bool outermost_ = false;
};

template <typename T>
void Layer<T>::take_spare_output() {
    std::vector<std::vector<T>>* spares = active_spares<T>();
    if (!spares || spares->empty() || !owns_output() || output_.data.capacity() > 0) return;
    // This layer's output was recycled in the last pass: take the smallest spare that holds
    // that output's size (growing one would write zeros over the difference; a larger one,
    // shrunk now, would have to grow later), else the largest; the most recently freed
    // (warmest in cache) among equals.
    const auto better = [&](size_t have, size_t candidate) {
        const bool have_fits = have >= recycled_size_, fits = candidate >= recycled_size_;
        if (have_fits != fits) return fits;
        return fits ? candidate <= have : candidate >= have;
    };
    size_t pick = 0;
    for (size_t i = 1; i < spares->size(); ++i)
        if (better((*spares)[pick].size(), (*spares)[i].size())) pick = i;
    output_.data = std::move((*spares)[pick]);
    spares->erase(spares->begin() + std::ptrdiff_t(pick));
}

template <typename T>
const Tensor<T>& Layer<T>::forward_without_grad(const Tensor<T>& input) {
    take_spare_output();
    const Tensor<T>& output = forward_impl(input);
    input_ = nullptr;  // nothing kept for a backward
    return output;
}

template <typename T>
const Tensor<T>* Layer<T>::forward_fused(const Tensor<T>& input, const Conv2dEpilogue<T>& then,
                                         int64_t channels) {
    InUse::Hold hold(in_use_, *this);
    output_hidden_ = false;
    take_spare_output();
    const Tensor<T>* output = forward_then(input, then, channels);
    input_ = nullptr;
    return output;
}

template <typename T>
void Layer<T>::skipped() {
    recycle_output();  // a large output kept from an earlier pass is storage to reuse
    input_ = nullptr;
    output_hidden_ = true;
}

template <typename T>
void Layer<T>::recycle_output() {
    // Smaller outputs stay: they stay in cache anyway, and a buffer that one thread wrote
    // for one layer and another for the next moves between the cores' caches.
    std::vector<std::vector<T>>* spares = active_spares<T>();
    if (!spares || output_.data.size() * sizeof(T) < kMinRecycledBytes) return;
    recycled_size_ = output_.data.size();
    spares->push_back(std::move(output_.data));
    output_.data = {};
    output_.shape.clear();
    output_hidden_ = true;
    if (spares->size() > kMaxSpareOutputs) spares->erase(spares->begin());
}

template <typename T>
json::Object Layer<T>::config() const {
    json::Object out{{"type", type()}};
    if (!arguments_) return out;
    const LayerType* declared = find_layer_type(arguments_->type());
    for (const Field& f : declared->fields)
        if (f.saved) out.emplace_back(f.name, *json::find(arguments_->values(), f.name));
    return out;
}

template <typename T>
const Tensor<T>& Layer<T>::accept_grad_output(const Tensor<T>& grad_output, const char* type,
                                              const char* op) {
    const Tensor<T>& input = require_forward(input_, type);
    check_same_shape(op, "output", output_.shape, "doutput", grad_output.shape);
    grad_output_ = &grad_output;
    return input;
}

template <typename T>
Tensor<T>::Tensor(Shape s, std::vector<T> values) : shape(std::move(s)), data(std::move(values)) {
    if (int64_t(data.size()) != numel(shape))
        throw std::invalid_argument("[Tensor] values: expected " + std::to_string(numel(shape)) +
                                    " for shape " + shape_str(shape) + ", got " +
                                    std::to_string(data.size()));
}

template <typename T>
void Tensor<T>::resize(const Shape& s) {
    shape = s;
    data.resize(size_t(numel(s)));
}

template <typename T>
void Tensor<T>::resize(std::initializer_list<int64_t> dims) {
    shape.assign(dims);  // reuses the shape's storage
    data.resize(size_t(numel(shape)));
}

// ---- WeightedLayer, Conv2d ------------------------------------------------------------------

template <typename T>
std::vector<std::pair<std::string, Parameter<T>*>> WeightedLayer<T>::named_parameters() {
    if (has_bias_) return {{"weight", &weight}, {"bias", &bias}};
    return {{"weight", &weight}};
}

template <typename T>
void WeightedLayer<T>::init_parameters(const Shape& weight_shape, int64_t fan_in) {
    numel(weight_shape);
    weight.value = kaiming_uniform<T>(weight_shape, fan_in);
    if (has_bias_) bias.value = kaiming_uniform<T>({weight_shape[0]}, fan_in);
}

template <typename T>
template <typename Kernel>
const Tensor<T>& WeightedLayer<T>::weighted_backward(const Tensor<T>& grad_output, Kernel kernel) {
    const Tensor<T>& input = *this->input_;
    this->grad_output_ = &grad_output;
    this->grad_input_.resize(input.shape);
    dweight_.resize(weight.value.shape);
    if (has_bias_) dbias_.resize(bias.value.shape);
    kernel(this->grad_input_.data.data(), dweight_.data.data(),
           has_bias_ ? dbias_.data.data() : nullptr, grad_output.data.data(), input.data.data(),
           weight.value.data.data());
    accumulate(weight, dweight_);
    if (has_bias_) accumulate(bias, dbias_);
    return this->grad_input_;
}

template <typename T>
Conv2d<T>::Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel_size)
    : Conv2d(Conv2dOptions(in_channels, out_channels, kernel_size)) {}

template <typename T>
Conv2d<T>::Conv2d(int64_t in_channels, int64_t out_channels, std::array<int64_t, 2> kernel_size)
    : Conv2d(Conv2dOptions(in_channels, out_channels, kernel_size)) {}

template <typename T>
Conv2d<T>::Conv2d(const Conv2dOptions& options)
    : Conv2d(find_layer_type("Conv2d")->parse({}, options.arguments())) {}

// The layer's Conv2dParams from its arguments, checked as torch's constructor checks them:
// channels divisible by groups, 'same' only with stride 1.
static Conv2dParams conv2d_params(const Config& arguments) {
    const auto stride = arguments.pair("stride"), dilation = arguments.pair("dilation");
    const int64_t in_channels = arguments.integer("in_channels"),
                  out_channels = arguments.integer("out_channels"),
                  groups = arguments.integer("groups");
    Conv2dParams params;
    params.stride_h = stride[0], params.stride_w = stride[1];
    params.dilation_h = dilation[0], params.dilation_w = dilation[1];
    params.groups = groups;
    const std::string mode = arguments.padding_mode("padding");
    if (mode.empty()) {
        const auto padding = arguments.pair("padding");
        params.pad_h = padding[0], params.pad_w = padding[1];
    }
    params.same_padding = mode == "same";
    if (in_channels % groups != 0 || out_channels % groups != 0)
        throw std::invalid_argument("[Conv2d] groups: expected a divisor of in_channels " +
                                    std::to_string(in_channels) + " and out_channels " +
                                    std::to_string(out_channels) + ", got " +
                                    std::to_string(groups));
    if (params.same_padding && (stride[0] != 1 || stride[1] != 1))
        throw std::invalid_argument(
            "[Conv2d] padding: expected stride 1 with padding='same' (torch's rule), got stride (" +
            std::to_string(stride[0]) + ", " + std::to_string(stride[1]) + ")");
    return params;
}

template <typename T>
Conv2d<T>::Conv2d(const Config& arguments) : WeightedLayer<T>(arguments) {
    const auto kernel = arguments.pair("kernel_size");
    params = conv2d_params(arguments);
    const int64_t in_per_group = arguments.integer("in_channels") / params.groups;
    const Shape shape{arguments.integer("out_channels"), in_per_group, kernel[0], kernel[1]};
    numel(shape);  // the weight's size is checked before fan_in multiplies its dims
    this->init_parameters(shape, in_per_group * kernel[0] * kernel[1]);
}

// the weight (K, C, R, S) and the bias (K,)
static int64_t weighted_layer_parameters(int64_t out, std::initializer_list<int64_t> per_output,
                                         bool bias) {
    int64_t count = out;
    for (int64_t d : per_output) count = checked_product({count, d}, kMaxElements);
    return count + (bias ? out : 0);
}

CNNBP_REGISTER_LAYER(Conv2d,
                     {"Conv2d",
                      "conv2d",
                      "y (N, K, P, Q) = conv2d(x (N, C, H, W), weight (K, C / groups, R, S)) + "
                      "bias (K,)",
                      {{"in_channels", FieldKind::Int, nullptr, 1},
                       {"out_channels", FieldKind::Int, nullptr, 1},
                       {"kernel_size", FieldKind::Pair, nullptr, 1},
                       {"stride", FieldKind::Pair, 1, 1},
                       {"padding", FieldKind::Padding, 0, 0},
                       {"dilation", FieldKind::Pair, 1, 1},
                       {"groups", FieldKind::Int, 1, 1},
                       {"bias", FieldKind::Bool, true}},
                      {},
                      [](const Config& c) {
                          const auto k = c.pair("kernel_size");
                          return weighted_layer_parameters(
                              c.integer("out_channels"),
                              {c.integer("in_channels") / c.integer("groups"), k[0], k[1]},
                              c.boolean("bias"));
                      }});
template <typename T>
const Tensor<T>& Conv2d<T>::forward_impl(const Tensor<T>& input) {
    return *forward_then(input, {}, -1);
}

// the forward, then the epilogue (an empty one: the plain forward)
template <typename T>
const Tensor<T>* Conv2d<T>::forward_then(const Tensor<T>& input, const Conv2dEpilogue<T>& then,
                                         int64_t channels) {
    const Conv2dDims dims =
        conv2d_dims(input.shape, this->weight.value.shape,
                    this->has_bias_ ? &this->bias.value.shape : nullptr, params);
    // a BatchNorm2d takes (N, C, H, W) of its own C: else its forward reports the mismatch
    if (then.center && (!dims.batched || channels != dims.K)) return nullptr;
    dims_ = dims;
    this->input_ = &input;
    this->output_.resize(conv2d_output_shape(dims_));
    conv2d_forward(this->output_.data.data(), input.data.data(), this->weight.value.data.data(),
                   this->has_bias_ ? this->bias.value.data.data() : nullptr, dims_, then);
    return &this->output_;
}

template <typename T>
const Tensor<T>& Conv2d<T>::backward_impl(const Tensor<T>& grad_output) {
    require_forward(this->input_, "Conv2d");
    conv2d_check_doutput(dims_, grad_output.shape);
    return this->weighted_backward(grad_output,
                                   [&](auto... pointers) { conv2d_backward(pointers..., dims_); });
}

// ---- Linear ------------------------------------------------------------------------------

template <typename T>
Linear<T>::Linear(int64_t in_features, int64_t out_features, bool bias)
    : Linear(arguments_of("Linear", {in_features, out_features, bias})) {}

template <typename T>
Linear<T>::Linear(const Config& arguments) : WeightedLayer<T>(arguments) {
    const int64_t in_features = arguments.integer("in_features"),
                  out_features = arguments.integer("out_features");
    this->init_parameters({out_features, in_features}, in_features);
}

CNNBP_REGISTER_LAYER(Linear, {"Linear",
                              "linear",
                              "y (*, out) = x (*, in) . weight (out, in)^T + bias (out,)",
                              {{"in_features", FieldKind::Int, nullptr, 1},
                               {"out_features", FieldKind::Int, nullptr, 1},
                               {"bias", FieldKind::Bool, true}},
                              {},
                              [](const Config& c) {
                                  return weighted_layer_parameters(c.integer("out_features"),
                                                                   {c.integer("in_features")},
                                                                   c.boolean("bias"));
                              }});

template <typename T>
const Tensor<T>& Linear<T>::forward_impl(const Tensor<T>& input) {
    dims_ = linear_dims(input.shape, this->weight.value.shape,
                        this->has_bias_ ? &this->bias.value.shape : nullptr);
    this->input_ = &input;
    this->output_.shape = input.shape;  // (*, out): reuses the shape's storage
    this->output_.shape.back() = dims_.OUT;
    this->output_.resize(this->output_.shape);
    linear_forward(this->output_.data.data(), input.data.data(), this->weight.value.data.data(),
                   this->has_bias_ ? this->bias.value.data.data() : nullptr, dims_);
    return this->output_;
}

template <typename T>
const Tensor<T>& Linear<T>::backward_impl(const Tensor<T>& grad_output) {
    linear_check_doutput(dims_, require_forward(this->input_, "Linear").shape, grad_output.shape);
    return this->weighted_backward(grad_output,
                                   [&](auto... pointers) { linear_backward(pointers..., dims_); });
}

// ---- MaxPool2d, activations, Flatten -------------------------------------------------------

template <typename T>
Pool2d<T>::Pool2d(const Config& arguments) : Layer<T>(arguments) {
    params = pool2d_window(arguments.pair("kernel_size"), arguments.pair("stride"),
                           arguments.pair("padding"));
    // the options each pool declares (MaxPool2d: dilation; AvgPool2d: count_include_pad,
    // divisor_override); the others keep the struct's defaults
    if (arguments.has("dilation")) {
        const auto dilation = arguments.pair("dilation");
        params.dilation_h = dilation[0];
        params.dilation_w = dilation[1];
    }
    params.ceil_mode = arguments.boolean("ceil_mode");
    if (arguments.has("count_include_pad"))
        params.count_include_pad = arguments.boolean("count_include_pad");
    if (arguments.has("divisor_override"))
        params.divisor_override = arguments.optional_integer("divisor_override");
    pool2d_check_params(arguments.type().c_str(), params);
}

template <typename T>
Tensor<T>& Pool2d<T>::start_forward(const Tensor<T>& input, const char* op) {
    dims_ = pool2d_dims(op, input.shape, params);
    this->input_ = &input;
    this->output_.resize(pool2d_output_shape(dims_));
    return this->output_;
}

template <typename T>
Tensor<T>& Pool2d<T>::start_backward(const Tensor<T>& grad_output, const char* type,
                                     const char* op) {
    this->grad_input_.resize(this->accept_grad_output(grad_output, type, op).shape);
    return this->grad_input_;
}

// The window every pool declares first, then its own options.
static std::vector<Field> pool2d_fields(std::initializer_list<Field> options) {
    std::vector<Field> fields{{"kernel_size", FieldKind::Pair, nullptr, 1},
                              {"stride", FieldKind::Pair, nullptr, 1, "kernel_size"},
                              {"padding", FieldKind::Pair, 0, 0}};
    fields.insert(fields.end(), options);
    return fields;
}

// torch.nn.MaxPool2d's arguments: kernel_size, stride (default: the kernel size), padding
// (at most half the kernel), dilation, ceil_mode. A model file written before dilation and
// ceil_mode existed reads them as their defaults.
const std::vector<Field> max_pool2d_fields =
    pool2d_fields({{"dilation", FieldKind::Pair, 1, 1}, {"ceil_mode", FieldKind::Bool, false}});

// torch.nn.AvgPool2d's: kernel_size, stride, padding, ceil_mode, count_include_pad,
// divisor_override (None or a nonzero int)
const std::vector<Field> avg_pool2d_fields =
    pool2d_fields({{"ceil_mode", FieldKind::Bool, false},
                   {"count_include_pad", FieldKind::Bool, true},
                   {"divisor_override", FieldKind::OptionalInt}});

template <typename T>
MaxPool2d<T>::MaxPool2d(const MaxPool2dOptions& options)
    : MaxPool2d(find_layer_type("MaxPool2d")->parse({}, options.arguments())) {}

template <typename T>
std::vector<TraceExtra> MaxPool2d<T>::trace_extras() const {
    if (this->output_.shape.empty()) return {};
    return {{"indices", this->output_.shape, indices.data(), nullptr}};
}

template <typename T>
const Tensor<T>& MaxPool2d<T>::forward_impl(const Tensor<T>& input) {
    Tensor<T>& output = this->start_forward(input, "max_pool2d");
    indices.resize(size_t(output.size()));
    max_pool2d_forward(output.data.data(), indices.data(), input.data.data(), this->dims_);
    return output;
}

template <typename T>
const Tensor<T>& MaxPool2d<T>::backward_impl(const Tensor<T>& grad_output) {
    Tensor<T>& grad_input = this->start_backward(grad_output, "MaxPool2d", "max_pool2d_backward");
    max_pool2d_backward(grad_input.data.data(), grad_output.data.data(), indices.data(),
                        this->dims_);
    return grad_input;
}

CNNBP_REGISTER_LAYER(MaxPool2d, {"MaxPool2d",
                                 "max_pool2d",
                                 "y, argmax = max over each kernel_size window; backward routes "
                                 "dL/dy to the argmax",
                                 max_pool2d_fields,
                                 {"indices"}});

template <typename T>
AvgPool2d<T>::AvgPool2d(const AvgPool2dOptions& options)
    : AvgPool2d(find_layer_type("AvgPool2d")->parse({}, options.arguments())) {}

template <typename T>
const Tensor<T>& AvgPool2d<T>::forward_impl(const Tensor<T>& input) {
    Tensor<T>& output = this->start_forward(input, "avg_pool2d");
    avg_pool2d_forward(output.data.data(), input.data.data(), this->dims_);
    return output;
}

template <typename T>
const Tensor<T>& AvgPool2d<T>::backward_impl(const Tensor<T>& grad_output) {
    Tensor<T>& grad_input = this->start_backward(grad_output, "AvgPool2d", "avg_pool2d_backward");
    avg_pool2d_backward(grad_input.data.data(), grad_output.data.data(), this->dims_);
    return grad_input;
}

CNNBP_REGISTER_LAYER(AvgPool2d, {"AvgPool2d", "avg_pool2d",
                                 "y = the mean over each kernel_size window (the divisor: "
                                 "divisor_override, else the window's cells, padding included "
                                 "with count_include_pad); backward spreads dL/dy evenly",
                                 avg_pool2d_fields});

// ---- AdaptiveAvgPool2d ---------------------------------------------------------------------

namespace {

json::Value optional_size(const std::optional<int64_t>& v) {
    return v ? json::Value(*v) : json::Value(nullptr);
}

}  // namespace

template <typename T>
AdaptiveAvgPool2d<T>::AdaptiveAvgPool2d(int64_t output_size)
    : AdaptiveAvgPool2d(arguments_of("AdaptiveAvgPool2d", {output_size})) {}

template <typename T>
AdaptiveAvgPool2d<T>::AdaptiveAvgPool2d(AdaptiveOutputSize output_size)
    // (a one-element list: {json::Array{...}} would copy the pair as the argument list)
    : AdaptiveAvgPool2d(arguments_of("AdaptiveAvgPool2d",
                                     {json::Value(json::Array{optional_size(output_size[0]),
                                                              optional_size(output_size[1])})})) {}

template <typename T>
AdaptiveAvgPool2d<T>::AdaptiveAvgPool2d(const Config& arguments)
    : Layer<T>(arguments), output_size_(arguments.optional_pair("output_size")) {
    adaptive_pool2d_check_output_size(arguments.type().c_str(), output_size_);
}

template <typename T>
const Tensor<T>& AdaptiveAvgPool2d<T>::forward_impl(const Tensor<T>& input) {
    dims_ = adaptive_pool2d_dims("adaptive_avg_pool2d", input.shape, output_size_);
    this->input_ = &input;
    this->output_.resize(adaptive_pool2d_output_shape(dims_));
    adaptive_avg_pool2d_forward(this->output_.data.data(), input.data.data(), dims_);
    return this->output_;
}

template <typename T>
const Tensor<T>& AdaptiveAvgPool2d<T>::backward_impl(const Tensor<T>& grad_output) {
    const Tensor<T>& input =
        this->accept_grad_output(grad_output, "AdaptiveAvgPool2d", "adaptive_avg_pool2d_backward");
    this->grad_input_.resize(input.shape);
    adaptive_avg_pool2d_backward(this->grad_input_.data.data(), grad_output.data.data(), dims_);
    return this->grad_input_;
}

// torch.nn.AdaptiveAvgPool2d's one argument: output_size, an int or an (h, w) pair whose
// elements may be None (the input's size along that axis)
CNNBP_REGISTER_LAYER(AdaptiveAvgPool2d,
                     {"AdaptiveAvgPool2d",
                      "adaptive_avg_pool2d",
                      "y (N, C, *output_size) = the mean over each adaptive window (torch's "
                      "rule: cells floor(i*L/O) to ceil((i+1)*L/O)); backward spreads dL/dy "
                      "evenly",
                      {{"output_size", FieldKind::OptionalPair, nullptr, 1}}});

// ---- BatchNorm2d ---------------------------------------------------------------------------

template <typename T>
BatchNorm2d<T>::BatchNorm2d(int64_t num_features)
    : BatchNorm2d(arguments_of("BatchNorm2d", {num_features})) {}

template <typename T>
BatchNorm2d<T>::BatchNorm2d(const BatchNorm2dOptions& options)
    : BatchNorm2d(find_layer_type("BatchNorm2d")->parse({}, options.arguments())) {}

template <typename T>
BatchNorm2d<T>::BatchNorm2d(const Config& arguments)
    : Layer<T>(arguments),
      C_(arguments.integer("num_features")),
      eps_(arguments.number("eps")),
      momentum_(arguments.optional_number("momentum")),
      affine_(arguments.boolean("affine")),
      track_(arguments.boolean("track_running_stats")) {
    batch_norm2d_params("BatchNorm2d", true, momentum_.value_or(0.0), eps_);  // eps > 0
    numel({C_});
    if (affine_) {  // torch's init: weight ones, bias zeros
        weight.value = Tensor<T>({C_}, T(1));
        bias.value = Tensor<T>({C_}, T(0));
    }
    if (track_) {
        running_mean = Tensor<T>({C_}, T(0));
        running_var = Tensor<T>({C_}, T(1));
        num_batches_tracked = Tensor<int64_t>({}, 0);
    }
}

// torch.nn.BatchNorm2d's arguments: num_features, eps, momentum (a number in [0, 1] or None),
// affine, track_running_stats; it holds 2 * C parameters (affine) and 2 * C running statistics
// and a counter (track_running_stats)
CNNBP_REGISTER_LAYER(BatchNorm2d,
                     {"BatchNorm2d",
                      "batch_norm2d",
                      "y = (x - mean) / sqrt(var + eps) * weight + bias per channel of x (N, C, H, "
                      "W): the batch's statistics while training (the running ones updated), the "
                      "running ones in eval mode",
                      {{"num_features", FieldKind::Int, nullptr, 1},
                       {"eps", FieldKind::Number, 1e-5},
                       {"momentum", FieldKind::OptionalProbability, 0.1},
                       {"affine", FieldKind::Bool, true},
                       {"track_running_stats", FieldKind::Bool, true}},
                      {},
                      [](const Config& c) {
                          const int64_t C = c.integer("num_features");
                          return (c.boolean("affine") ? 2 * C : 0) +
                                 (c.boolean("track_running_stats") ? 2 * C + 1 : 0);
                      }});

template <typename T>
std::vector<std::pair<std::string, Parameter<T>*>> BatchNorm2d<T>::named_parameters() {
    if (!affine_) return {};
    return {{"weight", &weight}, {"bias", &bias}};
}

template <typename T>
std::vector<std::pair<std::string, Buffer<T>>> BatchNorm2d<T>::named_buffers() {
    if (!track_) return {};
    return {{"running_mean", {&running_mean, nullptr}},
            {"running_var", {&running_var, nullptr}},
            {"num_batches_tracked", {nullptr, &num_batches_tracked}}};
}

template <typename T>
const Tensor<T>& BatchNorm2d<T>::forward_impl(const Tensor<T>& input) {
    const char* op = "batch_norm2d";
    if (input.shape.size() == 4 && input.shape[1] != C_)
        throw std::invalid_argument(std::string("[") + op + "] input: expected " +
                                    std::to_string(C_) + " channels (num_features), got shape " +
                                    shape_str(input.shape));
    // torch: the batch's statistics while training, and always without running statistics
    BatchNorm2dParams params{this->training_ || !track_, 0.0, eps_};
    const Shape* stats = track_ ? &running_mean.shape : nullptr;
    dims_ = batch_norm2d_dims(op, input.shape, affine_ ? &weight.value.shape : nullptr,
                              affine_ ? &bias.value.shape : nullptr, stats, stats, params);
    const bool update = this->training_ && track_;
    if (update) {
        num_batches_tracked.data[0] += 1;
        // momentum None: the cumulative moving average (torch's exponential_average_factor)
        params.momentum = momentum_ ? *momentum_ : 1.0 / double(num_batches_tracked.data[0]);
    }
    this->input_ = &input;
    this->output_.resize(input.shape);
    batch_statistics_ = params.training;
    mean_.resize({C_});
    invstd_.resize({C_});
    batch_norm2d_forward(this->output_.data.data(), mean_.data.data(), invstd_.data.data(),
                         input.data.data(), affine_ ? weight.value.data.data() : nullptr,
                         affine_ ? bias.value.data.data() : nullptr,
                         track_ ? running_mean.data.data() : nullptr,
                         track_ ? running_var.data.data() : nullptr, dims_, params);
    if (!batch_statistics_)  // the backward's constants: the running statistics now
        for (int64_t c = 0; c < C_; ++c) {
            mean_.data[c] = running_mean.data[c];
            invstd_.data[c] = T(1.0 / std::sqrt(double(running_var.data[c]) + eps_));
        }
    return this->output_;
}

template <typename T>
bool BatchNorm2d<T>::eval_affine(std::vector<T>& center, std::vector<T>& scale,
                                 std::vector<T>& shift) const {
    if (this->training_ || !track_) return false;  // the batch's statistics
    center.resize(size_t(C_)), scale.resize(size_t(C_)), shift.resize(size_t(C_));
    batch_norm2d_eval_affine(center.data(), scale.data(), shift.data(),
                             affine_ ? weight.value.data.data() : nullptr,
                             affine_ ? bias.value.data.data() : nullptr, running_mean.data.data(),
                             running_var.data.data(), C_, eps_);
    return true;
}

template <typename T>
const Tensor<T>& BatchNorm2d<T>::backward_impl(const Tensor<T>& grad_output) {
    const Tensor<T>& input =
        this->accept_grad_output(grad_output, "BatchNorm2d", "batch_norm2d_backward");
    this->grad_input_.resize(input.shape);
    if (affine_) dweight_.resize({C_}), dbias_.resize({C_});
    batch_norm2d_backward(this->grad_input_.data.data(), affine_ ? dweight_.data.data() : nullptr,
                          affine_ ? dbias_.data.data() : nullptr, grad_output.data.data(),
                          input.data.data(), affine_ ? weight.value.data.data() : nullptr,
                          mean_.data.data(), invstd_.data.data(), dims_, batch_statistics_);
    if (affine_) accumulate(weight, dweight_), accumulate(bias, dbias_);
    return this->grad_input_;
}

template <typename T>
Dropout<T>::Dropout(double p) : Dropout(arguments_of("Dropout", {p})) {}

template <typename T>
Dropout<T>::Dropout(double p, uint64_t seed)
    : Dropout(arguments_of("Dropout",
                           {p, seed >> 63 ? json::Value(json::Value::Big{std::to_string(seed)})
                                          : json::Value(int64_t(seed))})) {}

template <typename T>
Dropout<T>::Dropout(const Config& arguments)
    : Layer<T>(arguments), params_(dropout_params("Dropout", arguments.number("p"))) {
    if (!arguments.seed("seed"))  // drawn once, so that every copy of the layer agrees
        this->arguments_->set("seed", int64_t(generator()() >> 1));
    seeds_.seed(*this->arguments_->seed("seed"));
}

template <typename T>
std::vector<TraceExtra> Dropout<T>::trace_extras() const {
    if (!dropped_) return {{"mask", {}, nullptr, nullptr}};
    return {{"mask", this->output_.shape, nullptr, mask.data()}};
}

template <typename T>
const Tensor<T>& Dropout<T>::forward_impl(const Tensor<T>& input) {
    this->input_ = &input;
    this->output_.resize(input.shape);
    dropped_ = this->training_;
    if (!dropped_) {  // evaluation: the identity
        std::copy(input.data.begin(), input.data.end(), this->output_.data.begin());
        return this->output_;
    }
    params_.seed = seeds_();
    mask.resize(input.data.size());
    dropout_forward(this->output_.data.data(), mask.data(), input.data.data(), input.size(),
                    params_);
    return this->output_;
}

template <typename T>
const Tensor<T>& Dropout<T>::backward_impl(const Tensor<T>& grad_output) {
    this->accept_grad_output(grad_output, "Dropout", "dropout_backward");
    this->grad_input_.resize(grad_output.shape);
    if (!dropped_) {
        std::copy(grad_output.data.begin(), grad_output.data.end(), this->grad_input_.data.begin());
        return this->grad_input_;
    }
    dropout_backward(this->grad_input_.data.data(), grad_output.data.data(), mask.data(),
                     grad_output.size(), params_);
    return this->grad_input_;
}

CNNBP_REGISTER_LAYER(Dropout, {"Dropout",
                               "dropout",
                               "while training, each element zeroed with probability p and the "
                               "rest scaled by 1 / (1 - p); the identity in eval mode",
                               {{"p", FieldKind::Probability, 0.5},
                                {"seed", FieldKind::Seed, nullptr, 0, "", false}},
                               {"mask"}});

template <typename T, typename Kind>
Elementwise<T, Kind>::Elementwise() : Elementwise(arguments_of(Kind::name, {})) {}

template <typename T, typename Kind>
const Tensor<T>& Elementwise<T, Kind>::forward_impl(const Tensor<T>& input) {
    this->input_ = &input;
    this->output_.resize(input.shape);
    Kind::forward(this->output_.data.data(), input.data.data(), input.size(), params_);
    return this->output_;
}

template <typename T, typename Kind>
const Tensor<T>& Elementwise<T, Kind>::backward_impl(const Tensor<T>& grad_output) {
    const Tensor<T>& input = require_forward(this->input_, Kind::name);
    const Tensor<T>& saved = Kind::saved[0] == 'z' ? input : this->output_;
    check_same_shape(Kind::backward_op, Kind::saved, saved.shape, "doutput", grad_output.shape);
    this->grad_output_ = &grad_output;
    this->grad_input_.resize(saved.shape);
    Kind::backward(this->grad_input_.data.data(), grad_output.data.data(), saved.data.data(),
                   saved.size(), params_);
    return this->grad_input_;
}

CNNBP_REGISTER_LAYER(ReLU, {"ReLU", "relu", "a = max(z, 0); dz = da where z > 0"});
CNNBP_REGISTER_LAYER(Sigmoid, {"Sigmoid", "sigmoid",
                               "a = 1 / (1 + exp(-z)); dz = da * a * (1 - a), from the output a"});
CNNBP_REGISTER_LAYER(Tanh,
                     {"Tanh", "tanh", "a = tanh(z); dz = da * (1 - a * a), from the output a"});

LeakyReLUKind::Params LeakyReLUKind::params(const Config& arguments) {
    return {leaky_relu_slope("LeakyReLU", arguments.number("negative_slope"))};
}

template <typename T>
LeakyReLU<T>::LeakyReLU(double negative_slope)
    : LeakyReLU(arguments_of("LeakyReLU", {negative_slope})) {}

CNNBP_REGISTER_LAYER(LeakyReLU, {"LeakyReLU",
                                 "leaky_relu",
                                 "a = z where z > 0, else z * negative_slope; dz = da, or da * "
                                 "negative_slope where z <= 0",
                                 {{"negative_slope", FieldKind::Number, 0.01}}});

GELUKind::Params GELUKind::params(const Config& arguments) {
    return {parse_gelu_approximate("GELU", arguments.text("approximate"))};
}

template <typename T>
GELU<T>::GELU(const std::string& approximate) : GELU(arguments_of("GELU", {approximate})) {}

CNNBP_REGISTER_LAYER(GELU, {"GELU",
                            "gelu",
                            "a = z * Phi(z), Phi the standard normal CDF (approximate='none': "
                            "by erf; 'tanh': torch's tanh approximation); dz from the input z",
                            {Field::choice("approximate", {"none", "tanh"}, "none")}});

CNNBP_REGISTER_LAYER(SiLU, {"SiLU", "silu",
                            "a = z * sigmoid(z); dz = da * s * (1 + z * (1 - s)), s = sigmoid(z)"});

CNNBP_REGISTER_LAYER(Identity, {"Identity", "identity", "a = z; dz = da"});

// ---- Softmax, LogSoftmax ---------------------------------------------------------------------

template <typename T>
Softmax<T>::Softmax(int64_t dim) : Softmax(arguments_of("Softmax", {dim})) {}

template <typename T>
LogSoftmax<T>::LogSoftmax(int64_t dim) : LogSoftmax(arguments_of("LogSoftmax", {dim})) {}

template <typename T, bool kLog>
const Tensor<T>& SoftmaxLayer<T, kLog>::forward_impl(const Tensor<T>& input) {
    dims_ = softmax_dims(kLog ? "log_softmax" : "softmax", input.shape, dim_);
    this->input_ = &input;
    this->output_.resize(input.shape);
    if constexpr (kLog)
        log_softmax_forward(this->output_.data.data(), input.data.data(), dims_);
    else
        softmax_forward(this->output_.data.data(), input.data.data(), dims_);
    return this->output_;
}

template <typename T, bool kLog>
const Tensor<T>& SoftmaxLayer<T, kLog>::backward_impl(const Tensor<T>& grad_output) {
    require_forward(this->input_, kLog ? "LogSoftmax" : "Softmax");
    const Tensor<T>& a = this->output_;
    check_same_shape(kLog ? "log_softmax_backward" : "softmax_backward", "a", a.shape, "doutput",
                     grad_output.shape);
    this->grad_output_ = &grad_output;
    this->grad_input_.resize(a.shape);
    if constexpr (kLog)
        log_softmax_backward(this->grad_input_.data.data(), grad_output.data.data(), a.data.data(),
                             dims_);
    else
        softmax_backward(this->grad_input_.data.data(), grad_output.data.data(), a.data.data(),
                         dims_);
    return this->grad_input_;
}

// dim: any int (negative counts from the end), checked against the input at forward
static const Field softmax_dim{"dim", FieldKind::Int, 1, std::numeric_limits<int64_t>::min()};

CNNBP_REGISTER_LAYER(Softmax, {"Softmax",
                               "softmax",
                               "a = exp(z) / sum(exp(z)) along dim, computed stably; dz = a * (da "
                               "- sum(da * a)), from the output a",
                               {softmax_dim}});
CNNBP_REGISTER_LAYER(LogSoftmax, {"LogSoftmax",
                                  "log_softmax",
                                  "a = z - log(sum(exp(z))) along dim, computed stably; dz = da - "
                                  "exp(a) * sum(da), from the output a",
                                  {softmax_dim}});

template <typename T>
Flatten<T>::Flatten() : Flatten(arguments_of("Flatten", {})) {}

template <typename T>
const Tensor<T>& Flatten<T>::forward_impl(const Tensor<T>& input) {
    if (input.shape.empty())
        throw std::invalid_argument(
            "[flatten] input: expected at least 1 dim (N, ...), got shape " +
            shape_str(input.shape));
    this->input_ = &input;
    // (N, the product of the other dims), also for an empty batch
    this->output_.shape = {input.shape[0],
                           numel(Shape(input.shape.begin() + 1, input.shape.end()))};
    this->output_.data = input.data;  // the trace owns its own copy
    return this->output_;
}

template <typename T>
const Tensor<T>& Flatten<T>::backward_impl(const Tensor<T>& grad_output) {
    const Tensor<T>& input = require_forward(this->input_, "Flatten");
    check_same_shape("flatten_backward", "output", this->output_.shape, "dF", grad_output.shape);
    this->grad_output_ = &grad_output;
    this->grad_input_.shape = input.shape;
    this->grad_input_.data = grad_output.data;
    return this->grad_input_;
}

CNNBP_REGISTER_LAYER(Flatten, {"Flatten", "flatten",
                               "F (N, C*H*W) = x (N, C, H, W) reshaped (torch's Flatten with "
                               "start_dim=1)"});

// ---- containers: Sequential, Residual, Concat ------------------------------------------------

namespace {

// Whether `target` is `layer` or sits somewhere below it.
template <typename T>
bool reaches(const Layer<T>* layer, const Layer<T>* target) {
    if (layer == target) return true;
    if (const auto* container = dynamic_cast<const Container<T>*>(layer))
        for (const auto& [name, child] : container->named_children())
            if (reaches<T>(child, target)) return true;
    return false;
}

// out = a + b, elementwise (the caller checked the shapes); threads split the elements
template <typename T>
void add_into(Tensor<T>& out, const Tensor<T>& a, const Tensor<T>& b, bool relu = false) {
    out.resize(a.shape);
    T* o = out.data.data();
    const T *x = a.data.data(), *y = b.data.data();
    detail::parallel_for(a.size(), a.size(), [=](int64_t begin, int64_t end) {
        if (!relu) {
            for (int64_t i = begin; i < end; ++i) o[i] = x[i] + y[i];
        } else {  // then relu_forward's select
            for (int64_t i = begin; i < end; ++i) {
                const T v = x[i] + y[i];
                o[i] = v <= T(0) ? T(0) : v;
            }
        }
    });
}

// Before a container dies: its children that live on (held elsewhere) may point at tensors
// that die with it, so they forget them.
template <typename T>
void release_children(const std::vector<std::shared_ptr<Layer<T>>>& children) {
    for (const auto& child : children)
        if (child && child.use_count() > 1) child->forget_borrowed();
}

}  // namespace

template <typename T>
std::vector<std::pair<std::string, Parameter<T>*>> Container<T>::named_parameters() {
    std::vector<std::pair<std::string, Parameter<T>*>> out;
    for (const auto& [prefix, child] : named_children())
        for (auto& [name, p] : child->named_parameters()) out.emplace_back(prefix + "." + name, p);
    return out;
}

template <typename T>
std::vector<std::pair<std::string, Buffer<T>>> Container<T>::named_buffers() {
    std::vector<std::pair<std::string, Buffer<T>>> out;
    for (const auto& [prefix, child] : named_children())
        for (auto& [name, b] : child->named_buffers()) out.emplace_back(prefix + "." + name, b);
    return out;
}

template <typename T>
std::vector<Parameter<T>*> Container<T>::parameters() {
    std::vector<Parameter<T>*> out;
    for (auto& named : named_parameters()) out.push_back(named.second);
    return out;
}

template <typename T>
void Container<T>::zero_grad() {
    for (const auto& named : named_children()) named.second->zero_grad();
}

template <typename T>
void Container<T>::train(bool mode) {
    Layer<T>::train(mode);
    for (const auto& named : named_children()) named.second->train(mode);
}

template <typename T>
void Container<T>::check_child(const Layer<T>* child, const std::string& what) const {
    const std::string type = this->type();
    if (!child)
        throw std::invalid_argument("[" + type + "] " + what + ": expected a layer, got null");
    if (reaches<T>(child, this))
        throw std::invalid_argument("[" + type + "] " + what +
                                    ": expected a layer that does not contain the " + type +
                                    ", got one that does");
}

template <typename T>
Sequential<T>::~Sequential() {
    release_children(layers_);
}

template <typename T>
Sequential<T>::Sequential(std::vector<std::shared_ptr<Layer<T>>> layers) {
    for (auto& layer : layers) add(std::move(layer));
}

template <typename T>
const std::shared_ptr<Layer<T>>& Sequential<T>::layer(size_t i) const {
    check_index("Sequential", i, layers_.size());
    return layers_[i];
}

template <typename T>
Sequential<T>::Sequential(Sequential&& other) noexcept : layers_(std::move(other.layers_)) {
    for (auto& layer : layers_) layer->forget_borrowed();
    other.result_ = nullptr, other.result_owner_ = nullptr;  // it holds no layers now
}

template <typename T>
void Sequential<T>::forget_borrowed() {
    Layer<T>::forget_borrowed();
    if (!layers_.empty()) {
        layers_.front()->forget_borrowed();
        layers_.back()->forget_borrowed();
    }
}

template <typename T>
Sequential<T>& Sequential<T>::add(std::shared_ptr<Layer<T>> layer) {
    this->check_child(layer.get(), "layer");
    layers_.push_back(std::move(layer));
    return *this;
}

template <typename T>
std::vector<std::pair<std::string, Layer<T>*>> Sequential<T>::named_children() const {
    std::vector<std::pair<std::string, Layer<T>*>> out;
    for (size_t i = 0; i < layers_.size(); ++i)
        out.emplace_back(std::to_string(i), layers_[i].get());
    return out;
}

template <typename T>
const Tensor<T>& Sequential<T>::forward_impl(const Tensor<T>& input) {
    if (layers_.empty()) throw std::invalid_argument("[Sequential] expected at least one layer");
    this->input_ = &input;
    result_ = nullptr;
    result_owner_ = nullptr;
    if (!grad_enabled()) return forward_without_grad_impl(input);
    const Tensor<T>* x = &input;
    for (auto& layer : layers_) x = &layer->forward(*x);
    return *x;
}

// Without gradients each output is recycled once the next layer has read it, and a layer
// that can apply the BatchNorm2d (evaluation mode, running statistics) and the ReLU after it
// to its output as it writes it (Conv2d; Residual the ReLU) does so in place of their
// passes: the same operations on the same values, so the same bits.
template <typename T>
const Tensor<T>& Sequential<T>::forward_without_grad_impl(const Tensor<T>& input) {
    using C = Container<T>;
    typename C::Recycling recycling(this->spare_outputs_);
    const size_t n = layers_.size();
    const Tensor<T>* x = &input;
    Layer<T>* owner = nullptr;  // whose output_ holds *x (null: the input)
    bool owner_fused = false;
    for (size_t i = 0; i < n;) {
        Layer<T>& layer = *layers_[i];
        const Tensor<T>* y = nullptr;
        size_t next = i + 1;
        if (const int parts = C::epilogue_parts_of(layer)) {
            Conv2dEpilogue<T> then;
            int64_t channels = -1;
            std::optional<InUse::Hold> norm_held, relu_held;  // read, not run
            auto* norm = next < n ? dynamic_cast<BatchNorm2d<T>*>(layers_[next].get()) : nullptr;
            if (norm && (parts & Layer<T>::kAffine)) {
                norm_held.emplace(norm->in_use(), *norm);
                if (norm->eval_affine(center_, scale_, shift_)) {
                    then.center = center_.data(), then.scale = scale_.data();
                    then.shift = shift_.data(), channels = norm->num_features();
                    ++next;
                }
            }
            Layer<T>* relu = next < n ? layers_[next].get() : nullptr;
            if (dynamic_cast<ReLU<T>*>(relu) && (parts & Layer<T>::kReLU)) {
                relu_held.emplace(relu->in_use(), *relu);
                then.relu = true;
                ++next;
            }
            if (next > i + 1) y = C::forward_fused_of(layer, *x, then, channels);
            if (y)
                for (size_t j = i + 1; j < next; ++j) C::skipped_of(*layers_[j]);
            else
                next = i + 1;
        }
        if (!y) y = &layer.forward(*x);
        if (owner) {
            C::recycle_output_of(*owner);
            if (owner_fused) C::hide_output_of(*owner);  // it holds what the group computed
        }
        owner = &layer;
        owner_fused = next > i + 1;
        x = y;
        i = next;
    }
    // the result; a fused head's trace shows no output (it holds what its group computed)
    result_ = x;
    result_owner_ = owner;
    if (owner_fused) C::hide_output_of(*owner);
    return *x;
}

template <typename T>
void Sequential<T>::recycle_output() {
    if (result_owner_) {
        this->recycle_output_of(*result_owner_);
        result_ = nullptr;
    } else if (!layers_.empty()) {
        this->recycle_output_of(*layers_.back());
    }
}

template <typename T>
const Tensor<T>& Sequential<T>::backward_impl(const Tensor<T>& grad_output) {
    if (layers_.empty()) throw std::invalid_argument("[Sequential] expected at least one layer");
    this->grad_output_ = &grad_output;
    const Tensor<T>* g = &grad_output;
    for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) g = &(*it)->backward(*g);
    return *g;
}

template <typename T>
const Tensor<T>& Sequential<T>::output() const {
    if (result_) return *result_;
    return layers_.empty() ? this->output_ : layers_.back()->output();
}

template <typename T>
const Tensor<T>& Sequential<T>::grad_input() const {
    return layers_.empty() ? this->grad_input_ : layers_.front()->grad_input();
}

template <typename T>
Residual<T>::Residual(std::shared_ptr<Layer<T>> block, std::shared_ptr<Layer<T>> shortcut)
    : block_(std::move(block)), shortcut_(std::move(shortcut)) {
    this->check_child(block_.get(), "block");
    if (shortcut_) this->check_child(shortcut_.get(), "shortcut");
    if (block_ == shortcut_)
        throw std::invalid_argument(
            "[Residual] shortcut: expected a layer other than the block (each keeps its own "
            "trace), got the block itself");
}

template <typename T>
Residual<T>::~Residual() {
    release_children<T>({block_, shortcut_});
}

template <typename T>
std::vector<std::pair<std::string, Layer<T>*>> Residual<T>::named_children() const {
    if (!shortcut_) return {{"block", block_.get()}};
    return {{"block", block_.get()}, {"shortcut", shortcut_.get()}};
}

template <typename T>
void Residual<T>::forget_borrowed() {
    Layer<T>::forget_borrowed();
    block_->forget_borrowed();
    if (shortcut_) shortcut_->forget_borrowed();
}

template <typename T>
const Tensor<T>& Residual<T>::forward_impl(const Tensor<T>& input) {
    return *forward_then(input, {}, -1);
}

// y = block(x) + skip(x), then the epilogue's ReLU (the only part it takes) as it is written
template <typename T>
const Tensor<T>* Residual<T>::forward_then(const Tensor<T>& input, const Conv2dEpilogue<T>& then,
                                           int64_t) {
    this->input_ = &input;
    std::optional<typename Container<T>::Recycling> recycling;
    if (!grad_enabled()) recycling.emplace(this->spare_outputs_);
    const Tensor<T>& main = block_->forward(input);
    const Tensor<T>& skip = shortcut_ ? shortcut_->forward(input) : input;
    if (main.shape != skip.shape)
        throw std::invalid_argument("[Residual] block output: expected the shape of the " +
                                    std::string(shortcut_ ? "shortcut's output " : "input ") +
                                    shape_str(skip.shape) + ", got shape " + shape_str(main.shape));
    add_into(this->output_, main, skip, then.relu);
    if (!grad_enabled()) {
        this->recycle_output_of(*block_);
        if (shortcut_) this->recycle_output_of(*shortcut_);
    }
    return &this->output_;
}

template <typename T>
const Tensor<T>& Residual<T>::backward_impl(const Tensor<T>& grad_output) {
    this->accept_grad_output(grad_output, "Residual", "Residual.backward");
    // y = block(x) + skip(x): dL/dx = dblock/dx^T dy + dskip/dx^T dy
    const Tensor<T>& through_block = block_->backward(grad_output);
    const Tensor<T>& through_skip = shortcut_ ? shortcut_->backward(grad_output) : grad_output;
    check_same_shape("Residual.backward", "block grad_input", through_block.shape,
                     "skip path's grad_input", through_skip.shape);
    add_into(this->grad_input_, through_block, through_skip);
    return this->grad_input_;
}

template <typename T>
Concat<T>::Concat(std::vector<std::shared_ptr<Layer<T>>> branches)
    : branches_(std::move(branches)), grad_slices_(branches_.size()) {
    if (branches_.empty())
        throw std::invalid_argument("[Concat] branches: expected at least one, got none");
    for (size_t i = 0; i < branches_.size(); ++i) {
        this->check_child(branches_[i].get(), "branch " + std::to_string(i));
        for (size_t j = 0; j < i; ++j)
            if (branches_[j] == branches_[i])
                throw std::invalid_argument(
                    "[Concat] branch " + std::to_string(i) +
                    ": expected a layer other than the earlier branches (each keeps its own "
                    "trace), got branch " +
                    std::to_string(j) + " again");
    }
}

template <typename T>
Concat<T>::~Concat() {
    release_children(branches_);
}

template <typename T>
const std::shared_ptr<Layer<T>>& Concat<T>::branch(size_t i) const {
    check_index("Concat", i, branches_.size());
    return branches_[i];
}

template <typename T>
std::vector<std::pair<std::string, Layer<T>*>> Concat<T>::named_children() const {
    std::vector<std::pair<std::string, Layer<T>*>> out;
    for (size_t i = 0; i < branches_.size(); ++i)
        out.emplace_back(std::to_string(i), branches_[i].get());
    return out;
}

template <typename T>
void Concat<T>::forget_borrowed() {
    Layer<T>::forget_borrowed();
    for (auto& branch : branches_) branch->forget_borrowed();
}

template <typename T>
const Tensor<T>& Concat<T>::forward_impl(const Tensor<T>& input) {
    this->input_ = &input;
    // outputs (N, K_i, rest...): the same N and rest, any K_i; checked once every branch has
    // run (a layer shared between branches may have changed an earlier one's output)
    std::optional<typename Container<T>::Recycling> recycling;
    if (!grad_enabled()) recycling.emplace(this->spare_outputs_);
    std::vector<const Tensor<T>*> outputs;
    for (auto& branch : branches_) outputs.push_back(&branch->forward(input));
    Shape shape;
    channels_.clear();
    for (size_t i = 0; i < outputs.size(); ++i) {
        const Shape& got = outputs[i]->shape;
        if (got.size() < 2)
            throw std::invalid_argument("[Concat] branch " + std::to_string(i) +
                                        " output: expected at least 2 dims (N, K, ...), got "
                                        "shape " +
                                        shape_str(got));
        channels_.push_back(got[1]);
        if (i == 0) {
            shape = got;
            continue;
        }
        Shape expected = shape;
        expected[1] = got[1];
        if (got != expected)
            throw std::invalid_argument(
                "[Concat] branch " + std::to_string(i) + " output: expected shape " +
                shape_str(expected) + " (branch 0's but along dim 1), got shape " + shape_str(got));
        shape[1] += got[1];
    }
    this->output_.resize(shape);
    // (N, K, inner...) with inner the product of the dims after the channels
    const int64_t N = shape[0], K = shape[1], inner = numel(Shape(shape.begin() + 2, shape.end()));
    T* out = this->output_.data.data();
    for (int64_t n = 0; n < N; ++n) {
        int64_t offset = 0;  // in channels, along dim 1
        for (const Tensor<T>* y : outputs) {
            const int64_t block = y->shape[1] * inner;
            std::copy_n(y->data.data() + n * block, block, out + (n * K + offset) * inner);
            offset += y->shape[1];
        }
    }
    if (!grad_enabled())
        for (auto& branch : branches_) this->recycle_output_of(*branch);
    return this->output_;
}

template <typename T>
const Tensor<T>& Concat<T>::backward_impl(const Tensor<T>& grad_output) {
    const Tensor<T>& input = this->accept_grad_output(grad_output, "Concat", "Concat.backward");
    const Shape& shape = grad_output.shape;
    const int64_t N = shape[0], K = shape[1], inner = numel(Shape(shape.begin() + 2, shape.end()));
    int64_t offset = 0;
    for (size_t i = 0; i < branches_.size(); ++i) {
        // branch i's slice of dL/dy: channels [offset, offset + K_i)
        Tensor<T>& slice = grad_slices_[i];
        Shape slice_shape = shape;
        slice_shape[1] = channels_[i];  // as the forward split them
        slice.resize(slice_shape);
        const int64_t block = slice_shape[1] * inner;
        for (int64_t n = 0; n < N; ++n)
            std::copy_n(grad_output.data.data() + (n * K + offset) * inner, block,
                        slice.data.data() + n * block);
        offset += slice_shape[1];
    }
    // dL/dx = the sum over branches of each branch's input gradient
    for (size_t i = 0; i < branches_.size(); ++i) {
        const Tensor<T>& dx = branches_[i]->backward(grad_slices_[i]);
        check_same_shape("Concat.backward", "input", input.shape,
                         ("branch " + std::to_string(i) + " grad_input").c_str(), dx.shape);
        if (i == 0) {
            this->grad_input_.resize(dx.shape);
            std::copy(dx.data.begin(), dx.data.end(), this->grad_input_.data.begin());
        } else {
            for (int64_t j = 0, n = dx.size(); j < n; ++j) this->grad_input_.data[j] += dx.data[j];
        }
    }
    return this->grad_input_;
}

// ---- losses --------------------------------------------------------------------------------

template <typename T>
double Loss<T>::forward_impl(const Tensor<T>&, const Tensor<T>&) {
    throw std::invalid_argument(std::string("[") + op() +
                                "] target: expected class indices (int64), got floats");
}

template <typename T>
double Loss<T>::forward_impl(const Tensor<T>&, const Tensor<int64_t>&) {
    throw std::invalid_argument(std::string("[") + op() +
                                "] target: expected probabilities like the input, got class "
                                "indices (int64)");
}

template <typename T>
const Tensor<T>& Loss<T>::backward(double grad_loss) {
    InUse::Hold hold(in_use_, *this);
    if (!has_run_) throw std::logic_error("[" + type() + "] backward called before forward");
    if (reduction() == Reduction::None)
        throw std::invalid_argument(
            std::string("[") + op() + "_backward] grad_output: expected an array of shape " +
            shape_str(losses_.shape) + " (the loss's, reduction='none'), got a number");
    grad_input_.resize(input_.shape);
    gradient(nullptr, grad_loss);
    return grad_input_;
}

template <typename T>
const Tensor<T>& Loss<T>::backward(const Tensor<T>& grad_output) {
    InUse::Hold hold(in_use_, *this);
    if (!has_run_) throw std::logic_error("[" + type() + "] backward called before forward");
    const std::string name = std::string(op()) + "_backward";
    if (reduction() != Reduction::None) {
        if (!grad_output.shape.empty())
            throw std::invalid_argument(
                "[" + name + "] grad_output: expected a number (the loss is reduced), got shape " +
                shape_str(grad_output.shape));
        return backward(double(grad_output.data[0]));
    }
    check_same_shape(name.c_str(), "the loss", losses_.shape, "grad_output", grad_output.shape);
    grad_input_.resize(input_.shape);
    gradient(grad_output.data.data(), 1.0);
    return grad_input_;
}

template <typename T>
void Loss<T>::keep(const Tensor<T>& input) {
    input_.shape = input.shape;
    input_.data.assign(input.data.begin(), input.data.end());  // reuses the storage
}

template <typename T>
void Loss<T>::keep_target(const Tensor<T>& target) {
    target_.shape = target.shape;
    target_.data.assign(target.data.begin(), target.data.end());
}

template <typename T>
T* Loss<T>::losses_for(const Shape& shape) {
    if (reduction() != Reduction::None) {
        losses_ = Tensor<T>();
        return nullptr;
    }
    losses_.resize(shape);
    return losses_.data.data();
}

namespace {
// An option's weight in T, or nothing.
template <typename T>
std::optional<Tensor<T>> weight_in(const std::optional<Tensor<double>>& weight) {
    if (!weight) return std::nullopt;
    return Tensor<T>(weight->shape, std::vector<T>(weight->data.begin(), weight->data.end()));
}

// `weight` expanded to `shape` in `out`; nullptr when there is no weight
template <typename T>
const T* expand_weight(const char* op, const char* name, const std::optional<Tensor<T>>& weight,
                       const Shape& shape, Tensor<T>& out) {
    if (!weight) return nullptr;
    check_expandable(op, name, weight->shape, shape);
    out.resize(shape);
    expand_to(out.data.data(), shape, weight->data.data(), weight->shape);
    return out.data.data();
}

template <typename T>
const T* data_of(const std::optional<Tensor<T>>& t, const Tensor<T>& expanded) {
    return t ? expanded.data.data() : nullptr;
}
}  // namespace

template <typename T>
BCELoss<T>::BCELoss(const BCELossOptions& options)
    : weight_(weight_in<T>(options.weight())), reduction_(options.reduction()) {}

template <typename T>
double BCELoss<T>::forward_impl(const Tensor<T>& input, const Tensor<T>& target) {
    check_bce_shapes(this->op(), input.shape, target.shape);
    check_probabilities(this->op(), input.data.data(), input.size());
    const T* weight = expand_weight(this->op(), "weight", weight_, input.shape, expanded_weight_);
    this->keep(input);
    this->keep_target(target);
    if (!weight && reduction_ == Reduction::Mean) {
        this->value_ =
            binary_cross_entropy_forward(input.data.data(), target.data.data(), input.size());
        this->losses_ = Tensor<T>();
    } else {
        T* losses = this->losses_for(input.shape);
        this->value_ = binary_cross_entropy_forward(losses, input.data.data(), target.data.data(),
                                                    weight, input.size(), reduction_);
    }
    this->has_run_ = true;
    return this->value_;
}

template <typename T>
void BCELoss<T>::gradient(const T* grad_output, double grad) {
    T* dinput = this->grad_input_.data.data();
    const T *a = this->input_.data.data(), *y = this->target_.data.data();
    if (!weight_ && reduction_ == Reduction::Mean && grad == 1.0)
        return binary_cross_entropy_backward(dinput, a, y, this->input_.size());
    binary_cross_entropy_backward(dinput, a, y, data_of(weight_, expanded_weight_),
                                  this->input_.size(), reduction_, grad_output, grad);
}

template <typename T>
BCEWithLogitsLoss<T>::BCEWithLogitsLoss(const BCEWithLogitsLossOptions& options)
    : weight_(weight_in<T>(options.weight())),
      pos_weight_(weight_in<T>(options.pos_weight())),
      reduction_(options.reduction()) {}

template <typename T>
double BCEWithLogitsLoss<T>::forward_impl(const Tensor<T>& input, const Tensor<T>& target) {
    check_bce_shapes(this->op(), input.shape, target.shape);
    const T* weight = expand_weight(this->op(), "weight", weight_, input.shape, expanded_weight_);
    const T* pos_weight =
        expand_weight(this->op(), "pos_weight", pos_weight_, input.shape, expanded_pos_weight_);
    this->keep(input);
    this->keep_target(target);
    if (!weight && !pos_weight && reduction_ == Reduction::Mean) {
        this->value_ = binary_cross_entropy_with_logits_forward(input.data.data(),
                                                                target.data.data(), input.size());
        this->losses_ = Tensor<T>();
    } else {
        T* losses = this->losses_for(input.shape);
        this->value_ =
            binary_cross_entropy_with_logits_forward(losses, input.data.data(), target.data.data(),
                                                     weight, pos_weight, input.size(), reduction_);
    }
    this->has_run_ = true;
    return this->value_;
}

template <typename T>
void BCEWithLogitsLoss<T>::gradient(const T* grad_output, double grad) {
    T* dinput = this->grad_input_.data.data();
    const T *z = this->input_.data.data(), *y = this->target_.data.data();
    if (!weight_ && !pos_weight_ && reduction_ == Reduction::Mean && grad == 1.0)
        return binary_cross_entropy_with_logits_backward(dinput, z, y, this->input_.size());
    binary_cross_entropy_with_logits_backward(dinput, z, y, data_of(weight_, expanded_weight_),
                                              data_of(pos_weight_, expanded_pos_weight_),
                                              this->input_.size(), reduction_, grad_output, grad);
}

template <typename T>
CrossEntropyLoss<T>::CrossEntropyLoss(const CrossEntropyLossOptions& options)
    : weight_(weight_in<T>(options.weight())),
      params_(cross_entropy_params("CrossEntropyLoss", options.reduction(), options.ignore_index(),
                                   options.label_smoothing())) {
    if (weight_ && weight_->shape.size() != 1)
        throw std::invalid_argument(
            "[CrossEntropyLoss] weight: expected 1 dim (one weight per "
            "class), got shape " +
            shape_str(weight_->shape));
}

template <typename T>
double CrossEntropyLoss<T>::forward_impl(const Tensor<T>& input, const Tensor<int64_t>& target) {
    dims_ = cross_entropy_dims(this->op(), input.shape, target.shape);
    if (weight_) check_class_weight(this->op(), dims_, weight_->shape);
    check_labels(this->op(), target.data.data(), target.size(), dims_.K, params_.ignore_index);
    this->keep(input);
    this->labels_.shape = target.shape;
    this->labels_.data.assign(target.data.begin(), target.data.end());
    this->target_ = Tensor<T>();
    this->target_is_labels_ = true;
    plain_ = !weight_ && input.shape.size() == 2 && params_.reduction == Reduction::Mean &&
             params_.label_smoothing == 0.0 &&
             std::find(target.data.begin(), target.data.end(), params_.ignore_index) ==
                 target.data.end();
    if (plain_) {
        this->value_ =
            cross_entropy_forward(input.data.data(), target.data.data(), dims_.N, dims_.K);
        this->losses_ = Tensor<T>();
    } else {
        T* losses = this->losses_for(cross_entropy_loss_shape(input.shape));
        this->value_ = cross_entropy_forward(
            losses, input.data.data(), target.data.data(), static_cast<const T*>(nullptr),
            weight_ ? weight_->data.data() : nullptr, dims_, params_);
    }
    this->has_run_ = true;
    return this->value_;
}

template <typename T>
double CrossEntropyLoss<T>::forward_impl(const Tensor<T>& input, const Tensor<T>& target) {
    if (target.shape != input.shape)
        throw std::invalid_argument(std::string("[") + this->op() +
                                    "] target: expected class indices (int64), or probabilities "
                                    "of the logits' shape " +
                                    shape_str(input.shape) + ", got floats of shape " +
                                    shape_str(target.shape));
    dims_ = cross_entropy_dims(this->op(), input.shape, target.shape, true);
    check_ignore_index(this->op(), dims_, params_);
    if (weight_) check_class_weight(this->op(), dims_, weight_->shape);
    this->keep(input);
    this->keep_target(target);
    this->labels_ = Tensor<int64_t>();
    this->target_is_labels_ = false;
    plain_ = false;
    T* losses = this->losses_for(cross_entropy_loss_shape(input.shape));
    this->value_ = cross_entropy_forward(losses, input.data.data(),
                                         static_cast<const int64_t*>(nullptr), target.data.data(),
                                         weight_ ? weight_->data.data() : nullptr, dims_, params_);
    this->has_run_ = true;
    return this->value_;
}

template <typename T>
void CrossEntropyLoss<T>::gradient(const T* grad_output, double grad) {
    T* dinput = this->grad_input_.data.data();
    const T* logits = this->input_.data.data();
    if (plain_ && grad == 1.0)
        return cross_entropy_backward(dinput, logits, this->labels_.data.data(), dims_.N, dims_.K);
    cross_entropy_backward(
        dinput, logits, this->target_is_labels_ ? this->labels_.data.data() : nullptr,
        this->target_is_labels_ ? nullptr : this->target_.data.data(),
        weight_ ? weight_->data.data() : nullptr, dims_, params_, grad_output, grad);
}

template <typename T>
NLLLoss<T>::NLLLoss(const NLLLossOptions& options)
    : weight_(weight_in<T>(options.weight())),
      params_(cross_entropy_params("NLLLoss", options.reduction(), options.ignore_index(), 0.0)) {
    if (weight_ && weight_->shape.size() != 1)
        throw std::invalid_argument(
            "[NLLLoss] weight: expected 1 dim (one weight per class), got shape " +
            shape_str(weight_->shape));
}

template <typename T>
double NLLLoss<T>::forward_impl(const Tensor<T>& input, const Tensor<int64_t>& target) {
    dims_ = cross_entropy_dims(this->op(), input.shape, target.shape, false, "input");
    if (weight_) check_class_weight(this->op(), dims_, weight_->shape);
    check_labels(this->op(), target.data.data(), target.size(), dims_.K, params_.ignore_index);
    this->keep(input);
    this->labels_.shape = target.shape;
    this->labels_.data.assign(target.data.begin(), target.data.end());
    this->target_ = Tensor<T>();
    this->target_is_labels_ = true;
    T* losses = this->losses_for(cross_entropy_loss_shape(input.shape));
    this->value_ = nll_loss_forward(losses, input.data.data(), target.data.data(),
                                    weight_ ? weight_->data.data() : nullptr, dims_, params_);
    this->has_run_ = true;
    return this->value_;
}

template <typename T>
void NLLLoss<T>::gradient(const T* grad_output, double grad) {
    nll_loss_backward(this->grad_input_.data.data(), this->labels_.data.data(),
                      weight_ ? weight_->data.data() : nullptr, dims_, params_, grad_output, grad);
}

// ---- optimizers ----------------------------------------------------------------------------

template <typename T>
Optimizer<T>::Optimizer(std::string name, std::vector<Parameter<T>*> params, double lr)
    : name_(std::move(name)), params_(std::move(params)) {
    for (Parameter<T>* p : params_)
        if (!p)
            throw std::invalid_argument("[" + name_ + "] params: expected parameters, got null");
    set_lr(lr);
}

template <typename T>
void Optimizer<T>::set_lr(double lr) {
    if (!(lr >= 0))
        throw std::invalid_argument("[" + name_ + "] lr: expected >= 0, got " + number_str(lr));
    lr_ = lr;
}

template <typename T>
void Optimizer<T>::zero_grad() {
    for (Parameter<T>* p : params_) p->clear_grad();
}

template <typename T>
SGD<T>::SGD(std::vector<Parameter<T>*> params, double lr, double momentum, double weight_decay,
            double dampening, bool nesterov)
    : Optimizer<T>("SGD", std::move(params), lr),
      momentum_(momentum),
      weight_decay_(weight_decay),
      dampening_(dampening),
      nesterov_(nesterov),
      buffers_(this->params_.size()) {
    for (auto [name, value] :
         {std::pair{"momentum", momentum}, std::pair{"weight_decay", weight_decay}})
        if (!(value >= 0))
            throw std::invalid_argument(std::string("[SGD] ") + name + ": expected >= 0, got " +
                                        number_str(value));
    if (nesterov && (momentum <= 0 || dampening != 0))
        throw std::invalid_argument(
            "[SGD] nesterov: expected momentum > 0 and dampening 0, got momentum " +
            number_str(momentum) + ", dampening " + number_str(dampening));
}

template <typename T>
json::Object SGD<T>::settings() const {
    return {{"momentum", momentum_},
            {"weight_decay", weight_decay_},
            {"dampening", dampening_},
            {"nesterov", nesterov_}};
}

template <typename T>
void SGD<T>::step_impl() {
    const SgdParams p{this->lr_, momentum_, dampening_, weight_decay_, nesterov_};
    for (size_t i = 0; i < this->params_.size(); ++i) {
        Parameter<T>& param = *this->params_[i];
        if (!param.has_grad()) continue;
        check_same_shape("SGD", "param", param.value.shape, "grad", param.grad.shape);
        const bool is_new = momentum_ != 0 && buffers_[i].empty();
        if (is_new) buffers_[i].resize(param.value.data.size());
        sgd_step(param.value.data.data(), param.grad.data.data(),
                 momentum_ != 0 ? buffers_[i].data() : nullptr, is_new, p, param.value.size());
    }
}

template <typename T>
Adam<T>::Adam(std::vector<Parameter<T>*> params, double lr, double beta1, double beta2, double eps,
              double weight_decay)
    : Adam("Adam", std::move(params), lr, beta1, beta2, eps, weight_decay, false) {}

template <typename T>
Adam<T>::Adam(const char* name, std::vector<Parameter<T>*> params, double lr, double beta1,
              double beta2, double eps, double weight_decay, bool decoupled)
    : Optimizer<T>(name, std::move(params), lr),
      beta1_(beta1),
      beta2_(beta2),
      eps_(eps),
      weight_decay_(weight_decay),
      decoupled_(decoupled),
      steps_(this->params_.size(), 0),
      first_(this->params_.size()),
      second_(this->params_.size()) {
    for (auto [key, value] : {std::pair{"eps", eps}, std::pair{"weight_decay", weight_decay}})
        if (!(value >= 0))
            throw std::invalid_argument(std::string("[") + name + "] " + key +
                                        ": expected >= 0, got " + number_str(value));
    if (!(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1))
        throw std::invalid_argument(std::string("[") + name +
                                    "] betas: expected values in [0, 1), got (" +
                                    number_str(beta1) + ", " + number_str(beta2) + ")");
}

template <typename T>
AdamW<T>::AdamW(std::vector<Parameter<T>*> params, double lr, double beta1, double beta2,
                double eps, double weight_decay)
    : Adam<T>("AdamW", std::move(params), lr, beta1, beta2, eps, weight_decay, true) {}

template <typename T>
json::Object Adam<T>::settings() const {
    return {{"betas", json::Array{beta1_, beta2_}}, {"eps", eps_}, {"weight_decay", weight_decay_}};
}

template <typename T>
void Adam<T>::step_impl() {
    const AdamParams p{this->lr_, beta1_, beta2_, eps_, weight_decay_, decoupled_};
    for (size_t i = 0; i < this->params_.size(); ++i) {
        Parameter<T>& param = *this->params_[i];
        if (!param.has_grad()) continue;
        check_same_shape("Adam", "param", param.value.shape, "grad", param.grad.shape);
        auto& m = first_[i];
        auto& v = second_[i];
        if (m.empty()) m.assign(param.value.data.size(), T(0)), v.assign(m.size(), T(0));
        adam_step(param.value.data.data(), param.grad.data.data(), m.data(), v.data(), ++steps_[i],
                  p, param.value.size());
    }
}

// ---- the flat buffer of a model's tensors ------------------------------------------------

namespace {

template <typename T>
std::vector<Tensor<T>*> floating_buffers(Layer<T>& model) {
    std::vector<Tensor<T>*> out;
    for (auto& named : model.named_buffers())
        if (named.second.values) out.push_back(named.second.values);
    return out;
}

void check_flat(const char* op, int64_t expected, int64_t size) {
    if (size != expected)
        throw std::invalid_argument(std::string("[") + op + "] flat: expected " +
                                    std::to_string(expected) + " elements, got " +
                                    std::to_string(size));
}

}  // namespace

template <typename T>
int64_t flat_size(Layer<T>& model) {
    int64_t total = 0;
    for (auto& named : model.named_parameters()) total += named.second->value.size();
    return total;
}

template <typename T>
int64_t flat_buffer_size(Layer<T>& model) {
    int64_t total = 0;
    for (Tensor<T>* values : floating_buffers(model)) total += values->size();
    return total;
}

template <typename T>
void pack_gradients(T* flat, int64_t size, Layer<T>& model) {
    check_flat("pack_gradients", flat_size(model), size);
    for (auto& named : model.named_parameters()) {
        const Parameter<T>& p = *named.second;
        const int64_t n = p.value.size();
        if (p.has_grad())
            std::copy_n(p.grad.data.data(), n, flat);
        else
            std::fill_n(flat, n, T(0));
        flat += n;
    }
}

// the inverse of pack_gradients: flat[i] = grad[i], parameter by parameter
template <typename T>
void unpack_gradients(Layer<T>& model, const T* flat, int64_t size) {
    check_flat("unpack_gradients", flat_size(model), size);
    for (auto& named : model.named_parameters()) {
        Parameter<T>& p = *named.second;
        const int64_t n = p.value.size();
        if (p.has_grad()) std::copy_n(flat, n, p.grad.data.data());
        flat += n;
    }
}

template <typename T>
void pack_parameters(T* flat, int64_t size, Layer<T>& model) {
    check_flat("pack_parameters", flat_size(model), size);
    for (auto& named : model.named_parameters()) {
        const Tensor<T>& value = named.second->value;
        flat = std::copy_n(value.data.data(), value.size(), flat);
    }
}

template <typename T>
void unpack_parameters(Layer<T>& model, const T* flat, int64_t size) {
    check_flat("unpack_parameters", flat_size(model), size);
    for (auto& named : model.named_parameters()) {
        Tensor<T>& value = named.second->value;
        std::copy_n(flat, value.size(), value.data.data());
        flat += value.size();
    }
}

template <typename T>
void pack_buffers(T* flat, int64_t size, Layer<T>& model) {
    check_flat("pack_buffers", flat_buffer_size(model), size);
    for (Tensor<T>* values : floating_buffers(model))
        flat = std::copy_n(values->data.data(), values->size(), flat);
}

template <typename T>
void unpack_buffers(Layer<T>& model, const T* flat, int64_t size) {
    check_flat("unpack_buffers", flat_buffer_size(model), size);
    for (Tensor<T>* values : floating_buffers(model)) {
        std::copy_n(flat, values->size(), values->data.data());
        flat += values->size();
    }
}

template <typename T, typename Target>
double train_step(Sequential<T>& model, const Tensor<T>& input, const Tensor<Target>& target,
                  Loss<T>& loss, Optimizer<T>& optimizer) {
    if (loss.reduction() == Reduction::None)
        throw std::invalid_argument(
            "[train_step] loss: expected reduction 'mean' or 'sum' (a "
            "scalar loss to step on), got " +
            loss.type() + " with reduction 'none'");
    if (!grad_enabled())
        throw std::logic_error(
            "[train_step] expected gradients enabled, got a call under no_grad (NoGradGuard)");
    InUse::Hold model_held(model.in_use(), model), loss_held(loss.in_use(), loss),
        optimizer_held(optimizer.in_use(), optimizer);
    model.zero_grad();
    const double value = loss.forward(model.forward(input), target);
    model.backward(loss.backward());
    optimizer.step();
    return value;
}

#define CNNBP_INSTANTIATE(T)                                                                       \
    template struct Tensor<T>;                                                                     \
    template class Layer<T>;                                                                       \
    template class WeightedLayer<T>;                                                               \
    template class Pool2d<T>;                                                                      \
    template class Conv2d<T>;                                                                      \
    template class Linear<T>;                                                                      \
    template class MaxPool2d<T>;                                                                   \
    template class AvgPool2d<T>;                                                                   \
    template class AdaptiveAvgPool2d<T>;                                                           \
    template class BatchNorm2d<T>;                                                                 \
    template class Elementwise<T, TanhKind>;                                                       \
    template class Dropout<T>;                                                                     \
    template class Elementwise<T, ReLUKind>;                                                       \
    template class Elementwise<T, SigmoidKind>;                                                    \
    template class Elementwise<T, LeakyReLUKind>;                                                  \
    template class LeakyReLU<T>;                                                                   \
    template class Elementwise<T, GELUKind>;                                                       \
    template class GELU<T>;                                                                        \
    template class Elementwise<T, SiLUKind>;                                                       \
    template class Elementwise<T, IdentityKind>;                                                   \
    template class SoftmaxLayer<T, false>;                                                         \
    template class SoftmaxLayer<T, true>;                                                          \
    template class Softmax<T>;                                                                     \
    template class LogSoftmax<T>;                                                                  \
    template class Flatten<T>;                                                                     \
    template class Container<T>;                                                                   \
    template class Sequential<T>;                                                                  \
    template class Residual<T>;                                                                    \
    template class Concat<T>;                                                                      \
    template class Loss<T>;                                                                        \
    template class BCELoss<T>;                                                                     \
    template class BCEWithLogitsLoss<T>;                                                           \
    template class CrossEntropyLoss<T>;                                                            \
    template class NLLLoss<T>;                                                                     \
    template class Optimizer<T>;                                                                   \
    template class SGD<T>;                                                                         \
    template class Adam<T>;                                                                        \
    template class AdamW<T>;                                                                       \
    template double train_step<T, T>(Sequential<T>&, const Tensor<T>&, const Tensor<T>&, Loss<T>&, \
                                     Optimizer<T>&);                                               \
    template double train_step<T, int64_t>(Sequential<T>&, const Tensor<T>&,                       \
                                           const Tensor<int64_t>&, Loss<T>&, Optimizer<T>&);       \
    template int64_t flat_size<T>(Layer<T>&);                                                      \
    template int64_t flat_buffer_size<T>(Layer<T>&);                                               \
    template void pack_gradients<T>(T*, int64_t, Layer<T>&);                                       \
    template void unpack_gradients<T>(Layer<T>&, const T*, int64_t);                               \
    template void pack_parameters<T>(T*, int64_t, Layer<T>&);                                      \
    template void unpack_parameters<T>(Layer<T>&, const T*, int64_t);                              \
    template void pack_buffers<T>(T*, int64_t, Layer<T>&);                                         \
    template void unpack_buffers<T>(Layer<T>&, const T*, int64_t);
template struct Tensor<int64_t>;
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp::nn

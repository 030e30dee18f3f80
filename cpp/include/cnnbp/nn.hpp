// cnnbp/nn.hpp -- layers, a sequential container, losses and optimizers in C++, with the
// same names, weight layouts and semantics as the Python package (and PyTorch).
//
// Every layer keeps what its backward needs and shows it afterwards: input(), output(),
// grad_output() and grad_input(), and each parameter's value and accumulated grad -- the
// per-layer trace. forward() keeps a reference to its input: keep the input alive until
// backward() has run (a temporary does not compile; or hand the layer a tensor to keep:
// forward(layer.kept_input())). Parameter gradients accumulate across backward() calls until
// zero_grad(), as in PyTorch. Errors are "[op] ..." messages, of the types errors.hpp lists.
//
// Threads: a layer, model, loss or optimizer holds the state of its last call, so one
// object runs one call at a time: a call from a second thread meanwhile throws
// std::logic_error (InUse); separate objects may run in separate threads.
//
// Every layer type is declared once, with its arguments, in nn.cpp (see cnnbp/registry.hpp):
// a layer is built from C++ arguments or from a Config, e.g. make_layer<double>("Conv2d",
// {1, 1, 3}, {}), and reports its arguments as config() -- its model-file entry.
//
//   cnnbp::nn::Sequential<double> model;
//   model.add(std::make_unique<cnnbp::nn::Conv2d<double>>(1, 1, 3)) ... ;
//   model.add(std::make_unique<cnnbp::nn::Conv2d<double>>(
//       cnnbp::nn::Conv2dOptions(1, 6, 5).padding(2).groups(1)));  // options by name
//   cnnbp::nn::BCELoss<double> loss;  cnnbp::nn::SGD<double> sgd(model.parameters(), 0.1);
//   double L = cnnbp::nn::train_step(model, x, y, loss, sgd);
// Layers keep forward_impl/backward_impl (protected) for their work; forward/backward hold
// the layer and call them.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cnnbp/activation.hpp"
#include "cnnbp/conv2d.hpp"
#include "cnnbp/json.hpp"
#include "cnnbp/registry.hpp"
#include "cnnbp/shapes.hpp"
#include "cnnbp/threads.hpp"

namespace cnnbp::nn {

// An owning, dense, C-contiguous array.
template <typename T>
struct Tensor {
    Shape shape;
    std::vector<T> data;

    Tensor() = default;
    explicit Tensor(Shape s, T fill = T(0))
        : shape(std::move(s)), data(size_t(numel(shape)), fill) {}
    Tensor(Shape s, std::vector<T> values);  // values.size() must equal numel(s)
    int64_t size() const { return int64_t(data.size()); }
    // Give the tensor this shape, reusing its storage; contents are unspecified.
    void resize(const Shape& s);
    void resize(std::initializer_list<int64_t> dims);  // resize({N, C, H, W}), no temporary
};

// A trainable tensor and its gradient. Until the first backward after a zero_grad() there
// is no gradient (torch's None): has_grad() is false, and grad keeps its storage (stale
// values) for reuse.
template <typename T>
struct Parameter {
    Tensor<T> value;
    Tensor<T> grad;
    bool grad_set = false;
    bool has_grad() const { return grad_set; }
    void clear_grad() { grad_set = false; }
};

// A layer's state that is not trained but saved with it (BatchNorm2d's running statistics):
// a tensor of the layer's T, or an int64 counter (num_batches_tracked, shape ()).
template <typename T>
struct Buffer {
    Tensor<T>* values = nullptr;  // one of the two is set
    Tensor<int64_t>* counts = nullptr;
};

// Seeds the one generator that initializes new layers' weights (Kaiming-uniform, as
// torch's default) and draws Dropout's seeds: the same seed gives the same layers in C++
// and in Python (cnnbp.manual_seed).
void manual_seed(uint64_t seed);

// Gradient mode, per thread, as torch's: while a NoGradGuard lives on a thread, forwards on
// that thread keep nothing for a backward (torch.no_grad). The trace then holds no inputs,
// and a container's children's outputs that it has passed on are recycled: the next layer
// that needs storage takes the one most recently freed, so a pass runs on a few buffers that
// stay in cache instead of one per layer; and a Sequential runs a Conv2d with the
// eval-mode BatchNorm2d and ReLU after it (a Residual with the ReLU after it) as one pass
// (the layers it stands for show no output). Outputs are the same bits. A backward() after
// such a forward throws, as before any forward; the model's own output stays readable.
//   { cnnbp::nn::NoGradGuard no_grad; const auto& y = model.forward(x); ... }
bool grad_enabled();
void set_grad_enabled(bool enabled);  // what the guard does; prefer the guard
class NoGradGuard {
 public:
    NoGradGuard();
    ~NoGradGuard();
    NoGradGuard(const NoGradGuard&) = delete;
    NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
    bool previous_;
};

// What a layer's trace holds beyond its input, output and gradients: MaxPool2d's argmax
// indices, Dropout's mask; shaped like the output.
struct TraceExtra {
    std::string name;
    Shape shape;
    const int64_t* indices = nullptr;  // one of the two is set
    const uint8_t* mask = nullptr;
};

// One call at a time on an object: a layer, model, loss or optimizer holds the state of its
// last call, so a second thread calling it meanwhile would overwrite that state under the
// first. forward, backward, step and train_step hold their object for the whole call
// (InUse::Hold); the thread holding it may call in again (a container's children, the
// model's forward inside train_step), any other thread gets std::logic_error
// "[Sequential] in use by another thread: ...".
class InUse {
 public:
    InUse() = default;
    InUse(const InUse&) {}  // a copy is another object, not in use
    InUse& operator=(const InUse&) { return *this; }

    class Hold {
     public:
        // object: what the message names, by its type()
        template <typename Object>
        Hold(const InUse& in_use, const Object& object) : in_use_(&in_use) {
            std::thread::id owner;  // none
            const std::thread::id me = std::this_thread::get_id();
            if (in_use.owner_.compare_exchange_strong(owner, me, std::memory_order_acquire)) return;
            in_use_ = nullptr;  // not ours to release
            if (owner != me)
                throw std::logic_error("[" + object.type() +
                                       "] in use by another thread: one layer, model, loss or "
                                       "optimizer must not run two calls at once");
        }
        ~Hold() {
            if (in_use_) in_use_->owner_.store(std::thread::id(), std::memory_order_release);
        }
        Hold(const Hold&) = delete;
        Hold& operator=(const Hold&) = delete;

     private:
        detail::Busy busy_;  // the pool's threads stay awake while the object runs
        const InUse* in_use_;
    };

 private:
    mutable std::atomic<std::thread::id> owner_{};
};

template <typename T>
class Layer {
 public:
    virtual ~Layer() = default;
    // output = layer(input); input must stay alive until backward(), so a temporary does not
    // compile (forward(Tensor&&) is deleted).
    const Tensor<T>& forward(const Tensor<T>& input) {
        InUse::Hold hold(in_use_, *this);
        output_hidden_ = false;
        if (grad_enabled()) return forward_impl(input);
        return forward_without_grad(input);
    }
    const Tensor<T>& forward(Tensor<T>&&) = delete;
    // grad_input from grad_output; parameter gradients are accumulated. The trace keeps a
    // reference to grad_output, so a temporary does not compile either.
    const Tensor<T>& backward(const Tensor<T>& grad_output) {
        InUse::Hold hold(in_use_, *this);
        return backward_impl(grad_output);
    }
    const Tensor<T>& backward(Tensor<T>&&) = delete;
    // the flag forward and backward hold; a caller that prepares the layer's kept tensors
    // first (the Python bindings) holds it from before that
    const InUse& in_use() const { return in_use_; }
    // (name, parameter) pairs with torch's names: "weight", "bias".
    virtual std::vector<std::pair<std::string, Parameter<T>*>> named_parameters() { return {}; }
    // Forget the parameters' gradients (they become unset, as torch's set_to_none).
    virtual void zero_grad() {
        for (auto& named : named_parameters()) named.second->clear_grad();
    }
    // (name, buffer) pairs with torch's names: "running_mean", "running_var",
    // "num_batches_tracked"; a container prefixes them as its parameters ("1.running_mean").
    virtual std::vector<std::pair<std::string, Buffer<T>>> named_buffers() { return {}; }
    // "Conv2d", "ReLU", ...
    virtual std::string type() const = 0;
    // The arguments the layer was built from (all of them, normalized); nullptr for a
    // layer type that is not declared in the registry (Sequential, a Python module).
    const Config* arguments() const { return arguments_ ? &*arguments_ : nullptr; }
    // The model file's entry: {"type": ..., and every saved argument}.
    json::Object config() const;
    virtual std::vector<TraceExtra> trace_extras() const { return {}; }

    // the trace of the last forward and backward
    const Tensor<T>* input() const { return input_; }
    virtual const Tensor<T>& output() const { return output_hidden_ ? no_output() : output_; }
    const Tensor<T>* grad_output() const { return grad_output_; }
    virtual const Tensor<T>& grad_input() const { return grad_input_; }

    // Training mode (the default) or evaluation mode (train(false)): Dropout drops only
    // while training. A Sequential passes the mode to its layers.
    virtual void train(bool mode = true) { training_ = mode; }
    void eval() { train(false); }
    bool is_training() const { return training_; }

    // Storage the layer keeps for callers that cannot keep their tensors alive until
    // backward (the Python bindings): fill it, then forward(kept_input()).
    Tensor<T>& kept_input() { return kept_input_; }
    Tensor<T>& kept_grad_output() { return kept_grad_output_; }
    // Drop the trace's references to tensors the layer does not own; a Sequential that
    // goes away calls it on the layers that outlive it.
    virtual void forget_borrowed() {
        if (input_ != &kept_input_) input_ = nullptr;
        if (grad_output_ != &kept_grad_output_) grad_output_ = nullptr;
    }

 protected:
    Layer() = default;
    explicit Layer(Config arguments) : arguments_(std::move(arguments)) {}
    // the layer's work, called by forward and backward with the layer held
    virtual const Tensor<T>& forward_impl(const Tensor<T>& input) = 0;
    virtual const Tensor<T>& backward_impl(const Tensor<T>& grad_output) = 0;
    // The start of a backward whose grad_output has the output's shape: the forward ran
    // (else "[type] backward called before forward"), grad_output is checked against the
    // output (op names it) and kept for the trace. Returns the forward's input.
    const Tensor<T>& accept_grad_output(const Tensor<T>& grad_output, const char* type,
                                        const char* op);
    // Under NoGradGuard: whether forward_impl writes output_ (a Sequential returns its last
    // layer's instead), which then takes recycled storage first.
    virtual bool owns_output() const { return true; }
    // Under NoGradGuard, from a container: the parts of a Conv2dEpilogue this layer can apply
    // to its output as it writes it (kAffine: an eval-mode BatchNorm2d's map; kReLU), in place
    // of the layers that follow it, and that forward: the output, or nullptr (nothing done)
    // where it cannot take this one (channels: the BatchNorm2d's, or -1 without one).
    enum EpilogueParts { kAffine = 1, kReLU = 2 };
    virtual int epilogue_parts() const { return 0; }
    virtual const Tensor<T>* forward_then(const Tensor<T>&, const Conv2dEpilogue<T>&, int64_t) {
        return nullptr;
    }
    // Under NoGradGuard, from the container that passed this layer's output on: give the
    // output's storage back for reuse (the trace then shows no output).
    virtual void recycle_output();
    std::optional<Config> arguments_;
    const Tensor<T>* input_ = nullptr;
    const Tensor<T>* grad_output_ = nullptr;
    Tensor<T> output_, grad_input_;
    Tensor<T> kept_input_, kept_grad_output_;
    bool training_ = true;
    InUse in_use_;

 private:
    size_t recycled_size_ = 0;    // the output's size when last recycled
    bool output_hidden_ = false;  // the trace shows no output (recycled, or fused over)
    static const Tensor<T>& no_output() {
        static const Tensor<T> none;
        return none;
    }
    // under NoGradGuard: recycled storage for output_ when its own was recycled
    void take_spare_output();
    const Tensor<T>& forward_without_grad(const Tensor<T>& input);
    const Tensor<T>* forward_fused(const Tensor<T>& input, const Conv2dEpilogue<T>& then,
                                   int64_t channels);
    // under NoGradGuard, for a layer a fused forward stood in for: nothing in the trace
    void skipped();
    template <typename>
    friend class Container;
};

// A layer with a weight and an optional bias (Conv2d, Linear): their parameters, and the
// gradient buffers its backward fills before accumulating them.
template <typename T>
class WeightedLayer : public Layer<T> {
 public:
    std::vector<std::pair<std::string, Parameter<T>*>> named_parameters() override;
    bool has_bias() const { return has_bias_; }
    Parameter<T> weight, bias;

 protected:
    explicit WeightedLayer(Config arguments)
        : Layer<T>(std::move(arguments)), has_bias_(this->arguments_->boolean("bias")) {}
    // weight (weight_shape) and bias (weight_shape[0],) drawn Kaiming-uniform over fan_in;
    // the weight's size is checked before anything is drawn
    void init_parameters(const Shape& weight_shape, int64_t fan_in);
    // The backward after the caller's checks: kernel(dinput, dweight, dbias, doutput, input,
    // weight) fills the gradient buffers, then weight.grad (+)= dweight, bias.grad (+)= dbias;
    // returns grad_input.
    template <typename Kernel>
    const Tensor<T>& weighted_backward(const Tensor<T>& grad_output, Kernel kernel);
    bool has_bias_;
    Tensor<T> dweight_, dbias_;
};

// A layer's arguments by name, libtorch-style: the required ones in the constructor, every
// option by a setter that returns the options, e.g.
//   Conv2d<float>(Conv2dOptions(1, 6, 5).padding(2).dilation(2))
// The values are checked when the layer is built, by its declaration (the same messages as
// make_layer's and Python's).
template <typename Self>
class LayerOptions {
 public:
    const json::Object& arguments() const { return arguments_; }

 protected:
    Self& set(const std::string& name, json::Value value) {
        for (auto& [key, v] : arguments_)
            if (key == name) {
                v = std::move(value);
                return static_cast<Self&>(*this);
            }
        arguments_.emplace_back(name, std::move(value));
        return static_cast<Self&>(*this);
    }
    static json::Value pair(std::array<int64_t, 2> hw) { return json::Array{hw[0], hw[1]}; }
    json::Object arguments_;
};

// Conv2d's padding by name: Padding::Same keeps the output size (stride 1), Padding::Valid
// is no padding (torch's padding='same' / 'valid').
enum class Padding { Same, Valid };

class Conv2dOptions : public LayerOptions<Conv2dOptions> {
 public:
    Conv2dOptions(int64_t in_channels, int64_t out_channels, int64_t kernel_size)
        : Conv2dOptions(in_channels, out_channels, {kernel_size, kernel_size}) {}
    Conv2dOptions(int64_t in_channels, int64_t out_channels, std::array<int64_t, 2> kernel_size) {
        set("in_channels", in_channels).set("out_channels", out_channels);
        set("kernel_size", pair(kernel_size));
    }
    Conv2dOptions& stride(int64_t s) { return set("stride", s); }
    Conv2dOptions& stride(std::array<int64_t, 2> hw) { return set("stride", pair(hw)); }
    Conv2dOptions& padding(int64_t p) { return set("padding", p); }
    Conv2dOptions& padding(std::array<int64_t, 2> hw) { return set("padding", pair(hw)); }
    Conv2dOptions& padding(Padding mode) {
        return set("padding", mode == Padding::Same ? "same" : "valid");
    }
    Conv2dOptions& dilation(int64_t d) { return set("dilation", d); }
    Conv2dOptions& dilation(std::array<int64_t, 2> hw) { return set("dilation", pair(hw)); }
    Conv2dOptions& groups(int64_t g) { return set("groups", g); }
    Conv2dOptions& bias(bool b) { return set("bias", b); }
};

// The pools' window: kernel_size, then stride (default: the kernel size, torch's) and
// padding; each pool's options add their own.
template <typename Self>
class Pool2dWindowOptions : public LayerOptions<Self> {
 public:
    explicit Pool2dWindowOptions(int64_t kernel_size)
        : Pool2dWindowOptions({kernel_size, kernel_size}) {}
    explicit Pool2dWindowOptions(std::array<int64_t, 2> kernel_size) {
        this->set("kernel_size", this->pair(kernel_size));
    }
    Self& stride(int64_t s) { return this->set("stride", s); }
    Self& stride(std::array<int64_t, 2> hw) { return this->set("stride", this->pair(hw)); }
    Self& padding(int64_t p) { return this->set("padding", p); }
    Self& padding(std::array<int64_t, 2> hw) { return this->set("padding", this->pair(hw)); }
};

class MaxPool2dOptions : public Pool2dWindowOptions<MaxPool2dOptions> {
 public:
    using Pool2dWindowOptions::Pool2dWindowOptions;
    MaxPool2dOptions& dilation(int64_t d) { return set("dilation", d); }
    MaxPool2dOptions& dilation(std::array<int64_t, 2> hw) { return set("dilation", pair(hw)); }
    MaxPool2dOptions& ceil_mode(bool c) { return set("ceil_mode", c); }
};

class AvgPool2dOptions : public Pool2dWindowOptions<AvgPool2dOptions> {
 public:
    using Pool2dWindowOptions::Pool2dWindowOptions;
    AvgPool2dOptions& ceil_mode(bool c) { return set("ceil_mode", c); }
    AvgPool2dOptions& count_include_pad(bool c) { return set("count_include_pad", c); }
    AvgPool2dOptions& divisor_override(int64_t d) { return set("divisor_override", d); }
};

class BatchNorm2dOptions : public LayerOptions<BatchNorm2dOptions> {
 public:
    explicit BatchNorm2dOptions(int64_t num_features) { set("num_features", num_features); }
    BatchNorm2dOptions& eps(double e) { return set("eps", e); }
    // std::nullopt (torch's None): the cumulative moving average, factor 1 / num_batches_tracked
    BatchNorm2dOptions& momentum(std::optional<double> m) {
        return set("momentum", m ? json::Value(*m) : json::Value(nullptr));
    }
    BatchNorm2dOptions& affine(bool a) { return set("affine", a); }
    BatchNorm2dOptions& track_running_stats(bool t) { return set("track_running_stats", t); }
};

template <typename T>
class Conv2d : public WeightedLayer<T> {
 public:
    // weight (out_channels, in_channels, k, k) or (out_channels, in_channels, kernel[0],
    // kernel[1]), bias (out_channels,); every other option at torch's default
    Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel_size);
    Conv2d(int64_t in_channels, int64_t out_channels, std::array<int64_t, 2> kernel_size);
    // stride, padding (pairs, Padding::Same or Valid), dilation, groups (weight
    // (out_channels, in_channels / groups, ...)), bias, by name
    explicit Conv2d(const Conv2dOptions& options);
    explicit Conv2d(const Config& arguments);

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;
    int epilogue_parts() const override { return this->kAffine | this->kReLU; }
    const Tensor<T>* forward_then(const Tensor<T>& input, const Conv2dEpilogue<T>& then,
                                  int64_t channels) override;

 public:
    std::string type() const override { return "Conv2d"; }
    Conv2dParams params;

 private:
    Conv2dDims dims_{};
};

template <typename T>
class Linear : public WeightedLayer<T> {
 public:
    // weight (out_features, in_features), bias (out_features,)
    Linear(int64_t in_features, int64_t out_features, bool bias = true);
    explicit Linear(const Config& arguments);

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "Linear"; }

 private:
    LinearDims dims_{};
};

// A pooling layer's window (MaxPool2d, AvgPool2d); stride defaults to the kernel size.
template <typename T>
class Pool2d : public Layer<T> {
 public:
    Pool2dParams params;

 protected:
    explicit Pool2d(const Config& arguments);
    // the output sized for input (op's checks), to fill
    Tensor<T>& start_forward(const Tensor<T>& input, const char* op);
    // grad_output checked against the output, grad_input sized, to fill
    Tensor<T>& start_backward(const Tensor<T>& grad_output, const char* type, const char* op);
    Pool2dDims dims_{};
};

// torch.nn.MaxPool2d, every option; the positional constructors take torch's defaults
// (dilation 1, floored output size): make_layer("MaxPool2d", ...) or a Config sets the others
template <typename T>
class MaxPool2d : public Pool2d<T> {
 public:
    // stride = kernel_size, no padding (torch's defaults)
    explicit MaxPool2d(int64_t kernel_size) : MaxPool2d(MaxPool2dOptions(kernel_size)) {}
    explicit MaxPool2d(const MaxPool2dOptions& options);
    explicit MaxPool2d(const Config& arguments) : Pool2d<T>(arguments) {}

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "MaxPool2d"; }
    std::vector<TraceExtra> trace_extras() const override;
    std::vector<int64_t> indices;  // argmax of the last forward, flat h*W+w per plane
};

// torch.nn.AvgPool2d, every option; the positional constructors take torch's defaults
// (count_include_pad, floored output size, no divisor_override): make_layer("AvgPool2d", ...)
// or a Config sets the others
template <typename T>
class AvgPool2d : public Pool2d<T> {
 public:
    // stride = kernel_size, no padding (torch's defaults)
    explicit AvgPool2d(int64_t kernel_size) : AvgPool2d(AvgPool2dOptions(kernel_size)) {}
    explicit AvgPool2d(const AvgPool2dOptions& options);
    explicit AvgPool2d(const Config& arguments) : Pool2d<T>(arguments) {}

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "AvgPool2d"; }
};

// torch.nn.AdaptiveAvgPool2d(output_size): output (N, C, P, Q) of the given size whatever the
// input's, each cell the mean of its window (torch's rule, adaptive_pool2d.hpp); an element of
// output_size that is nullopt (torch's None) keeps the input's size along that axis.
template <typename T>
class AdaptiveAvgPool2d : public Layer<T> {
 public:
    explicit AdaptiveAvgPool2d(int64_t output_size);
    explicit AdaptiveAvgPool2d(AdaptiveOutputSize output_size);
    explicit AdaptiveAvgPool2d(const Config& arguments);

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "AdaptiveAvgPool2d"; }
    const AdaptiveOutputSize& output_size() const { return output_size_; }

 private:
    AdaptiveOutputSize output_size_;
    AdaptivePool2dDims dims_{};
};

// torch.nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True,
// track_running_stats=True) on (N, C, H, W), C = num_features. Training mode: the batch's
// statistics, and (track_running_stats) num_batches_tracked += 1 and the running statistics
// updated with momentum (nullopt: factor 1 / num_batches_tracked). Evaluation mode: the
// running statistics (without track_running_stats: the batch's, as torch). affine: weight
// (ones) and bias (zeros) (C,); the running statistics start at zeros and ones.
template <typename T>
class BatchNorm2d : public Layer<T> {
 public:
    explicit BatchNorm2d(int64_t num_features);
    explicit BatchNorm2d(const BatchNorm2dOptions& options);
    explicit BatchNorm2d(const Config& arguments);

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "BatchNorm2d"; }
    std::vector<std::pair<std::string, Parameter<T>*>> named_parameters() override;
    std::vector<std::pair<std::string, Buffer<T>>> named_buffers() override;
    bool affine() const { return affine_; }
    bool track_running_stats() const { return track_; }
    const std::optional<double>& momentum() const { return momentum_; }
    double eps() const { return eps_; }
    int64_t num_features() const { return C_; }
    // Whether the forward is one affine map per channel (evaluation mode with running
    // statistics): then center, scale and shift are its constants (batch_norm2d_eval_affine),
    // C values each.
    bool eval_affine(std::vector<T>& center, std::vector<T>& scale, std::vector<T>& shift) const;
    Parameter<T> weight, bias;            // (C,) with affine, else empty
    Tensor<T> running_mean, running_var;  // (C,) with track_running_stats, else empty
    Tensor<int64_t> num_batches_tracked;  // shape (), with track_running_stats

 private:
    int64_t C_;
    double eps_;
    std::optional<double> momentum_;
    bool affine_, track_;
    bool batch_statistics_ = true;  // whether the last forward normalized with the batch's
    Tensor<T> mean_, invstd_;       // the statistics the last forward normalized with
    Tensor<T> dweight_, dbias_;
    BatchNorm2dDims dims_{};
};

// An elementwise activation: output = Kind::forward(input), and grad_input =
// Kind::backward(grad_output, saved), where saved is the input z or the output a
// (Kind::saved names it). A kind's options (LeakyReLU's negative_slope, GELU's approximate)
// are its Params, read once from the checked arguments by Kind::params.
template <typename T, typename Kind>
class Elementwise : public Layer<T> {
 public:
    Elementwise();
    explicit Elementwise(const Config& arguments)
        : Layer<T>(arguments), params_(Kind::params(arguments)) {}

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return Kind::name; }
    const typename Kind::Params& params() const { return params_; }

 private:
    typename Kind::Params params_;
};

// A kind without options.
struct PlainKind {
    struct Params {};
    static Params params(const Config&) { return {}; }
};

struct ReLUKind : PlainKind {  // a = max(z, 0); dz = da where z > 0
    static constexpr const char* name = "ReLU";
    static constexpr const char* backward_op = "relu_backward";
    static constexpr const char* saved = "z";
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params&) {
        relu_forward(a, z, n);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T* z, int64_t n, const Params&) {
        relu_backward(dz, da, z, n);
    }
};
// a = z > 0 ? z : z * negative_slope; dz = da, or da * negative_slope where z <= 0
struct LeakyReLUKind {
    static constexpr const char* name = "LeakyReLU";
    static constexpr const char* backward_op = "leaky_relu_backward";
    static constexpr const char* saved = "z";
    struct Params {
        double negative_slope = 0.01;
    };
    static Params params(const Config& arguments);
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params& p) {
        leaky_relu_forward(a, z, n, p.negative_slope);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T* z, int64_t n, const Params& p) {
        leaky_relu_backward(dz, da, z, n, p.negative_slope);
    }
};
struct GELUKind {  // a = z * Phi(z) (or its tanh approximation); dz from z
    static constexpr const char* name = "GELU";
    static constexpr const char* backward_op = "gelu_backward";
    static constexpr const char* saved = "z";
    struct Params {
        GeluApproximate approximate = GeluApproximate::None;
    };
    static Params params(const Config& arguments);
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params& p) {
        gelu_forward(a, z, n, p.approximate);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T* z, int64_t n, const Params& p) {
        gelu_backward(dz, da, z, n, p.approximate);
    }
};
struct SiLUKind : PlainKind {  // a = z * sigmoid(z); dz = da * s * (1 + z * (1 - s)) from z
    static constexpr const char* name = "SiLU";
    static constexpr const char* backward_op = "silu_backward";
    static constexpr const char* saved = "z";
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params&) {
        silu_forward(a, z, n);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T* z, int64_t n, const Params&) {
        silu_backward(dz, da, z, n);
    }
};
struct SigmoidKind : PlainKind {  // a = 1 / (1 + exp(-z)); dz = da * a * (1 - a)
    static constexpr const char* name = "Sigmoid";
    static constexpr const char* backward_op = "sigmoid_backward";
    static constexpr const char* saved = "a";
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params&) {
        sigmoid_forward(a, z, n);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T* a, int64_t n, const Params&) {
        sigmoid_backward(dz, da, a, n);
    }
};
struct TanhKind : PlainKind {  // a = tanh(z); dz = da * (1 - a * a)
    static constexpr const char* name = "Tanh";
    static constexpr const char* backward_op = "tanh_backward";
    static constexpr const char* saved = "a";
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params&) {
        tanh_forward(a, z, n);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T* a, int64_t n, const Params&) {
        tanh_backward(dz, da, a, n);
    }
};
struct IdentityKind : PlainKind {  // a = z; dz = da (torch.nn.Identity, without arguments)
    static constexpr const char* name = "Identity";
    static constexpr const char* backward_op = "identity_backward";
    static constexpr const char* saved = "z";
    template <typename T>
    static void forward(T* a, const T* z, int64_t n, const Params&) {
        std::copy(z, z + n, a);
    }
    template <typename T>
    static void backward(T* dz, const T* da, const T*, int64_t n, const Params&) {
        std::copy(da, da + n, dz);
    }
};

template <typename T>
using ReLU = Elementwise<T, ReLUKind>;
template <typename T>
using SiLU = Elementwise<T, SiLUKind>;
template <typename T>
using Sigmoid = Elementwise<T, SigmoidKind>;
template <typename T>
using Tanh = Elementwise<T, TanhKind>;
template <typename T>
using Identity = Elementwise<T, IdentityKind>;

// torch.nn.LeakyReLU(negative_slope=0.01): any finite slope.
template <typename T>
class LeakyReLU : public Elementwise<T, LeakyReLUKind> {
 public:
    explicit LeakyReLU(double negative_slope = 0.01);
    explicit LeakyReLU(const Config& arguments) : Elementwise<T, LeakyReLUKind>(arguments) {}
    double negative_slope() const { return this->params().negative_slope; }
};

// torch.nn.GELU(approximate='none'): 'none' (the erf form) or 'tanh'.
template <typename T>
class GELU : public Elementwise<T, GELUKind> {
 public:
    explicit GELU(const std::string& approximate = "none");
    explicit GELU(const Config& arguments) : Elementwise<T, GELUKind>(arguments) {}
    GeluApproximate approximate() const { return this->params().approximate; }
};

// torch.nn.Softmax(dim=1) and LogSoftmax(dim=1): softmax or log_softmax along dim (negative
// counts from the end; checked against the input's dims at forward), the backward from the
// output a as torch's.
template <typename T, bool kLog>
class SoftmaxLayer : public Layer<T> {
 public:
    explicit SoftmaxLayer(const Config& arguments)
        : Layer<T>(arguments), dim_(arguments.integer("dim")) {}

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return kLog ? "LogSoftmax" : "Softmax"; }
    int64_t dim() const { return dim_; }

 private:
    int64_t dim_;
    SoftmaxDims dims_{};
};

template <typename T>
class Softmax : public SoftmaxLayer<T, false> {
 public:
    explicit Softmax(int64_t dim = 1);
    explicit Softmax(const Config& arguments) : SoftmaxLayer<T, false>(arguments) {}
};

template <typename T>
class LogSoftmax : public SoftmaxLayer<T, true> {
 public:
    explicit LogSoftmax(int64_t dim = 1);
    explicit LogSoftmax(const Config& arguments) : SoftmaxLayer<T, true>(arguments) {}
};

// torch.nn.Dropout: while training, each element is zeroed with probability p and the rest
// scaled by 1 / (1 - p); in evaluation mode it is the identity. Each training forward draws
// a new mask seed from the layer's generator (seeded at construction: by default from the
// generator manual_seed seeds), so a run is reproducible from its seeds.
template <typename T>
class Dropout : public Layer<T> {
 public:
    explicit Dropout(double p = 0.5);
    Dropout(double p, uint64_t seed);
    // a null seed is drawn now, and kept in arguments()
    explicit Dropout(const Config& arguments);

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "Dropout"; }
    std::vector<TraceExtra> trace_extras() const override;
    double p() const { return params_.p; }
    bool dropped() const { return dropped_; }  // whether the last forward applied a mask
    std::vector<uint8_t> mask;                 // of the last training forward: 1 kept, 0 dropped

 private:
    DropoutParams params_;
    std::mt19937_64 seeds_;
    bool dropped_ = false;  // whether the last forward applied the mask
};

// (N, ...) -> (N, product of the rest)
template <typename T>
class Flatten : public Layer<T> {
 public:
    Flatten();
    explicit Flatten(const Config& arguments) : Layer<T>(arguments) {}

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    std::string type() const override { return "Flatten"; }
};

// A layer made of layers (Sequential, Residual, Concat). Its children have names ("0",
// "block", ...), its parameters are the children's under dotted paths ("3.block.1.weight"),
// and train()/eval() and zero_grad() reach every layer below it. Containers nest freely;
// a container may not hold itself, directly or through another ("[Residual] block:
// expected a layer that does not contain the Residual").
// Layers are shared: one layer object may sit in several containers (and in Python), but
// a layer that runs twice in one forward keeps only its last trace, so the backward of such
// a model is wrong: give each position its own layer.
template <typename T>
class Container : public Layer<T> {
 public:
    // (name, child), in the order the forward runs them
    virtual std::vector<std::pair<std::string, Layer<T>*>> named_children() const = 0;
    // "0.weight", "block.1.bias", ... with the children's own names
    std::vector<std::pair<std::string, Parameter<T>*>> named_parameters() override;
    // "1.running_mean", "3.block.1.num_batches_tracked", ...
    std::vector<std::pair<std::string, Buffer<T>>> named_buffers() override;
    std::vector<Parameter<T>*> parameters();
    void zero_grad() override;
    void train(bool mode = true) override;

 protected:
    Container() = default;
    // `child` may join this container: not null, and neither this container nor holding it
    // (which would make the forward recurse forever); what names it in messages
    void check_child(const Layer<T>* child, const std::string& what) const;
    // Under NoGradGuard: a child's output, passed on and no longer needed, back for reuse
    static void recycle_output_of(Layer<T>& child) { child.recycle_output(); }
    static void hide_output_of(Layer<T>& child) { child.output_hidden_ = true; }
    static int epilogue_parts_of(const Layer<T>& child) { return child.epilogue_parts(); }
    static const Tensor<T>* forward_fused_of(Layer<T>& child, const Tensor<T>& input,
                                             const Conv2dEpilogue<T>& then, int64_t channels) {
        return child.forward_fused(input, then, channels);
    }
    static void skipped_of(Layer<T>& child) { child.skipped(); }
    // Under NoGradGuard, for the forward of the outermost container: the storage its
    // children's outputs recycle through, kept between passes
    class Recycling;
    std::vector<std::vector<T>> spare_outputs_;
};

template <typename T>
class Sequential : public Container<T> {
 public:
    Sequential() = default;
    // the layers in order, as add() takes them:
    //   Sequential<float> model({std::make_shared<Conv2d<float>>(1, 6, 5),
    //                            std::make_shared<ReLU<float>>(), ...});
    // (std::make_unique works too: a unique_ptr converts to the shared_ptr)
    explicit Sequential(std::vector<std::shared_ptr<Layer<T>>> layers);
    Sequential(const Sequential&) = delete;
    Sequential& operator=(const Sequential&) = delete;
    // takes the layers (and forgets the trace of the moved-from container)
    Sequential(Sequential&& other) noexcept;
    Sequential& operator=(Sequential&&) = delete;
    ~Sequential() override;
    Sequential& add(std::shared_ptr<Layer<T>> layer);

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;
    bool owns_output() const override { return false; }
    void recycle_output() override;

 public:
    std::vector<std::pair<std::string, Layer<T>*>> named_children() const override;
    std::string type() const override { return "Sequential"; }
    // the last layer's output and the first layer's grad_input
    const Tensor<T>& output() const override;
    const Tensor<T>& grad_input() const override;
    size_t size() const { return layers_.size(); }
    // the i-th layer; std::out_of_range "[Sequential] index: expected < 12, got 99"
    const std::shared_ptr<Layer<T>>& layer(size_t i) const;
    Layer<T>& operator[](size_t i) { return *layer(i); }
    Layer<T>& at(size_t i) { return *layer(i); }
    void forget_borrowed() override;

 private:
    std::vector<std::shared_ptr<Layer<T>>> layers_;
    // Under NoGradGuard: the last forward's result and the layer that holds it (the head
    // of a fused group at the end holds what the group stands for); null otherwise
    const Tensor<T>* result_ = nullptr;
    Layer<T>* result_owner_ = nullptr;
    std::vector<T> center_, scale_, shift_;  // a fused BatchNorm2d's constants
    const Tensor<T>& forward_without_grad_impl(const Tensor<T>& input);
};

// torch-style residual block: y = block(x) + x, or block(x) + shortcut(x) with a shortcut
// (a strided 1x1 Conv2d, say, when the block changes the shape). The backward sends dL/dy
// through both paths and adds the two input gradients: dL/dx = dblock + (dshortcut or dL/dy).
template <typename T>
class Residual : public Container<T> {
 public:
    explicit Residual(std::shared_ptr<Layer<T>> block,
                      std::shared_ptr<Layer<T>> shortcut = nullptr);
    Residual(const Residual&) = delete;
    Residual& operator=(const Residual&) = delete;
    ~Residual() override;

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;
    int epilogue_parts() const override { return this->kReLU; }
    const Tensor<T>* forward_then(const Tensor<T>& input, const Conv2dEpilogue<T>& then,
                                  int64_t channels) override;

 public:
    // "block", then "shortcut" when there is one
    std::vector<std::pair<std::string, Layer<T>*>> named_children() const override;
    std::string type() const override { return "Residual"; }
    const std::shared_ptr<Layer<T>>& block() const { return block_; }
    const std::shared_ptr<Layer<T>>& shortcut() const { return shortcut_; }  // may be null
    void forget_borrowed() override;

 private:
    std::shared_ptr<Layer<T>> block_, shortcut_;
};

// Branches side by side: y = the branches' outputs (N, K_i, ...) concatenated along dim 1
// (the channels) into (N, sum K_i, ...); the other dims must agree. The backward hands each
// branch its slice of dL/dy and adds the input gradients.
template <typename T>
class Concat : public Container<T> {
 public:
    explicit Concat(std::vector<std::shared_ptr<Layer<T>>> branches);
    Concat(const Concat&) = delete;
    Concat& operator=(const Concat&) = delete;
    ~Concat() override;

 protected:
    const Tensor<T>& forward_impl(const Tensor<T>& input) override;
    const Tensor<T>& backward_impl(const Tensor<T>& grad_output) override;

 public:
    // "0", "1", ...
    std::vector<std::pair<std::string, Layer<T>*>> named_children() const override;
    std::string type() const override { return "Concat"; }
    size_t size() const { return branches_.size(); }
    const std::shared_ptr<Layer<T>>& branch(size_t i) const;  // std::out_of_range past the end
    void forget_borrowed() override;

 private:
    std::vector<std::shared_ptr<Layer<T>>> branches_;
    std::vector<Tensor<T>> grad_slices_;  // each branch's part of dL/dy, kept for its trace
    std::vector<int64_t> channels_;       // K_i of each branch's output in the last forward
};

// ---- losses --------------------------------------------------------------------------------
// Options of the losses, named as torch's and set libtorch-style:
//   CrossEntropyLoss<float> ce(CrossEntropyLossOptions().ignore_index(0).label_smoothing(0.1));
//   BCEWithLogitsLoss<double> bce(BCEWithLogitsLossOptions().pos_weight(Tensor<double>({3},
//                                 {1.0, 2.0, 0.5})).reduction(Reduction::Sum));
// Weights are given in double and converted to the loss's T once, when it is built.
#define CNNBP_LOSS_OPTION(Options, Type, name, ...) \
 public:                                            \
    Options& name(Type value) {                     \
        name##_ = std::move(value);                 \
        return *this;                               \
    }                                               \
    const Type& name() const { return name##_; }    \
                                                    \
 private:                                           \
    Type name##_ __VA_ARGS__;

struct BCELossOptions {
    // broadcast to the input's shape (torch's expand)
    CNNBP_LOSS_OPTION(BCELossOptions, std::optional<Tensor<double>>, weight)
    CNNBP_LOSS_OPTION(BCELossOptions, Reduction, reduction, = Reduction::Mean)
};

struct BCEWithLogitsLossOptions {
    CNNBP_LOSS_OPTION(BCEWithLogitsLossOptions, std::optional<Tensor<double>>, weight)
    // the positive term's weight, broadcast to the input's shape (along the last dim, the
    // classes)
    CNNBP_LOSS_OPTION(BCEWithLogitsLossOptions, std::optional<Tensor<double>>, pos_weight)
    CNNBP_LOSS_OPTION(BCEWithLogitsLossOptions, Reduction, reduction, = Reduction::Mean)
};

struct CrossEntropyLossOptions {
    CNNBP_LOSS_OPTION(CrossEntropyLossOptions, std::optional<Tensor<double>>, weight)  // (K,)
    CNNBP_LOSS_OPTION(CrossEntropyLossOptions, int64_t, ignore_index, = -100)
    CNNBP_LOSS_OPTION(CrossEntropyLossOptions, Reduction, reduction, = Reduction::Mean)
    CNNBP_LOSS_OPTION(CrossEntropyLossOptions, double, label_smoothing, = 0.0)  // in [0, 1]
};

struct NLLLossOptions {
    CNNBP_LOSS_OPTION(NLLLossOptions, std::optional<Tensor<double>>, weight)  // (K,)
    CNNBP_LOSS_OPTION(NLLLossOptions, int64_t, ignore_index, = -100)
    CNNBP_LOSS_OPTION(NLLLossOptions, Reduction, reduction, = Reduction::Mean)
};
#undef CNNBP_LOSS_OPTION

// A loss: forward() returns the reduced loss ('mean' or 'sum'), or 0 for reduction 'none',
// whose per-element losses are losses(); backward() returns dL/d input of the last call
// given dL/d(loss): a number for a reduced loss, a tensor of losses()' shape for 'none'.
// A loss keeps copies of its arguments (they are small), so its trace outlives them.
template <typename T>
class Loss {
 public:
    virtual ~Loss() = default;
    // BCE losses: a target of the input's shape and dtype; CrossEntropyLoss: class
    // probabilities of the input's shape
    double forward(const Tensor<T>& input, const Tensor<T>& target) {
        InUse::Hold hold(in_use_, *this);
        return forward_impl(input, target);
    }
    // CrossEntropyLoss, NLLLoss: a target of class indices
    double forward(const Tensor<T>& input, const Tensor<int64_t>& target) {
        InUse::Hold hold(in_use_, *this);
        return forward_impl(input, target);
    }
    const InUse& in_use() const { return in_use_; }
    // whether the loss takes class indices (it may take probabilities too)
    virtual bool takes_class_indices() const { return false; }
    // dL/d input of the last forward, times grad_loss (dL/d loss: 1 when the loss is the
    // objective); for a reduced loss only
    const Tensor<T>& backward(double grad_loss = 1.0);
    // the same for reduction 'none': grad_output has losses()' shape (a shape () tensor is
    // a number, for a reduced loss)
    const Tensor<T>& backward(const Tensor<T>& grad_output);
    virtual std::string type() const = 0;
    // the kernel the loss's error messages name ("binary_cross_entropy", ...)
    virtual const char* op() const = 0;
    virtual Reduction reduction() const = 0;

    // the trace of the last forward and backward; has_run() is false before the first
    bool has_run() const { return has_run_; }
    const Tensor<T>& input() const { return input_; }
    // BCE losses, and CrossEntropyLoss given probabilities
    const Tensor<T>& target() const { return target_; }
    // CrossEntropyLoss given class indices, NLLLoss
    const Tensor<int64_t>& labels() const { return labels_; }
    bool target_is_labels() const { return target_is_labels_; }
    double value() const { return value_; }              // the reduced loss, 0 for 'none'
    const Tensor<T>& losses() const { return losses_; }  // reduction 'none' only
    const Tensor<T>& grad_input() const { return grad_input_; }

 protected:
    // grad_input_ = dL/d input_ of the last forward (grad_input_ has input_'s shape), given
    // dL/d(loss): grad_output (losses_' shape) for 'none', else the number grad
    virtual void gradient(const T* grad_output, double grad) = 0;
    // the loss's forward, called with the loss held; the base refuses the target's kind
    virtual double forward_impl(const Tensor<T>& input, const Tensor<T>& target);
    virtual double forward_impl(const Tensor<T>& input, const Tensor<int64_t>& target);
    InUse in_use_;
    // keeps a copy of input; throws if `input` is the loss's own storage
    void keep(const Tensor<T>& input);
    void keep_target(const Tensor<T>& target);
    // losses_ sized for 'none' (else emptied); returns its storage or nullptr
    T* losses_for(const Shape& shape);
    Tensor<T> input_, target_, grad_input_, losses_;
    Tensor<int64_t> labels_;
    bool target_is_labels_ = false;
    double value_ = 0.0;
    bool has_run_ = false;
};

template <typename T>
class BCELoss : public Loss<T> {  // input: probabilities in [0, 1]
 public:
    explicit BCELoss(const BCELossOptions& options = {});

 protected:
    double forward_impl(const Tensor<T>& input, const Tensor<T>& target) override;

 public:
    std::string type() const override { return "BCELoss"; }
    const char* op() const override { return "binary_cross_entropy"; }
    Reduction reduction() const override { return reduction_; }

 protected:
    void gradient(const T* grad_output, double grad) override;

 private:
    std::optional<Tensor<T>> weight_;
    Tensor<T> expanded_weight_;  // weight_ at the last input's shape
    Reduction reduction_;
};

template <typename T>
class BCEWithLogitsLoss : public Loss<T> {  // input: logits
 public:
    explicit BCEWithLogitsLoss(const BCEWithLogitsLossOptions& options = {});

 protected:
    double forward_impl(const Tensor<T>& input, const Tensor<T>& target) override;

 public:
    std::string type() const override { return "BCEWithLogitsLoss"; }
    const char* op() const override { return "binary_cross_entropy_with_logits"; }
    Reduction reduction() const override { return reduction_; }

 protected:
    void gradient(const T* grad_output, double grad) override;

 private:
    std::optional<Tensor<T>> weight_, pos_weight_;
    Tensor<T> expanded_weight_, expanded_pos_weight_;  // at the last input's shape
    Reduction reduction_;
};

// input (N, K) or (N, K, d1, ...) logits; target (N,) / (N, d1, ...) class indices or class
// probabilities of the input's shape
template <typename T>
class CrossEntropyLoss : public Loss<T> {
 public:
    explicit CrossEntropyLoss(const CrossEntropyLossOptions& options = {});

 protected:
    double forward_impl(const Tensor<T>& input, const Tensor<T>& target) override;
    double forward_impl(const Tensor<T>& input, const Tensor<int64_t>& target) override;

 public:
    bool takes_class_indices() const override { return true; }
    std::string type() const override { return "CrossEntropyLoss"; }
    const char* op() const override { return "cross_entropy"; }
    Reduction reduction() const override { return params_.reduction; }

 protected:
    void gradient(const T* grad_output, double grad) override;

 private:
    std::optional<Tensor<T>> weight_;
    CrossEntropyParams params_;
    CrossEntropyDims dims_{};
    bool plain_ = true;  // torch's defaults on (N, K) and no label ignored: the fast kernels
};

// input (N, K) or (N, K, d1, ...) log-probabilities (LogSoftmax's output); target (N,) /
// (N, d1, ...) class indices
template <typename T>
class NLLLoss : public Loss<T> {
 public:
    explicit NLLLoss(const NLLLossOptions& options = {});

 protected:
    double forward_impl(const Tensor<T>& input, const Tensor<int64_t>& target) override;

 public:
    bool takes_class_indices() const override { return true; }
    std::string type() const override { return "NLLLoss"; }
    const char* op() const override { return "nll_loss"; }
    Reduction reduction() const override { return params_.reduction; }

 protected:
    void gradient(const T* grad_output, double grad) override;

 private:
    std::optional<Tensor<T>> weight_;
    CrossEntropyParams params_;
    CrossEntropyDims dims_{};
};

// An optimizer updates the parameters it was given; they must outlive it.
template <typename T>
class Optimizer {
 public:
    // name: "SGD", "Adam", ... for error messages
    Optimizer(std::string name, std::vector<Parameter<T>*> params, double lr);
    virtual ~Optimizer() = default;
    // parameters without a gradient are skipped
    void step() {
        InUse::Hold hold(in_use_, *this);
        step_impl();
    }
    const InUse& in_use() const { return in_use_; }
    void zero_grad();
    // the learning rate, which a schedule may change between steps
    double lr() const { return lr_; }
    void set_lr(double lr);
    const std::vector<Parameter<T>*>& parameters() const { return params_; }
    const std::string& type() const { return name_; }
    // The constructor's arguments besides the parameters and lr, by torch's names: what a
    // model file keeps of an optimizer (SGD: momentum, weight_decay, dampening, nesterov;
    // Adam, AdamW: betas, eps, weight_decay).
    virtual json::Object settings() const = 0;

 protected:
    virtual void step_impl() = 0;  // called by step with the optimizer held
    std::string name_;
    std::vector<Parameter<T>*> params_;
    double lr_;
    InUse in_use_;
};

// torch.optim.SGD
template <typename T>
class SGD : public Optimizer<T> {
 public:
    SGD(std::vector<Parameter<T>*> params, double lr, double momentum = 0.0,
        double weight_decay = 0.0, double dampening = 0.0, bool nesterov = false);

 protected:
    void step_impl() override;

 public:
    json::Object settings() const override;
    // per parameter: its momentum buffer, empty until its first step with momentum
    std::vector<std::vector<T>>& momentum_buffers() { return buffers_; }
    const std::vector<std::vector<T>>& momentum_buffers() const { return buffers_; }

 private:
    double momentum_, weight_decay_, dampening_;
    bool nesterov_;
    std::vector<std::vector<T>> buffers_;
};

// torch.optim.Adam (amsgrad off; weight decay added to the gradient)
template <typename T>
class Adam : public Optimizer<T> {
 public:
    Adam(std::vector<Parameter<T>*> params, double lr = 1e-3, double beta1 = 0.9,
         double beta2 = 0.999, double eps = 1e-8, double weight_decay = 0.0);

 protected:
    void step_impl() override;

 public:
    json::Object settings() const override;
    // per parameter: steps taken, and the first and second moments (empty before the first)
    std::vector<int64_t>& steps() { return steps_; }
    std::vector<std::vector<T>>& first_moments() { return first_; }
    std::vector<std::vector<T>>& second_moments() { return second_; }
    const std::vector<int64_t>& steps() const { return steps_; }
    const std::vector<std::vector<T>>& first_moments() const { return first_; }
    const std::vector<std::vector<T>>& second_moments() const { return second_; }

 protected:
    Adam(const char* name, std::vector<Parameter<T>*> params, double lr, double beta1, double beta2,
         double eps, double weight_decay, bool decoupled);

 private:
    double beta1_, beta2_, eps_, weight_decay_;
    bool decoupled_;  // AdamW: decay the parameter, not the gradient
    std::vector<int64_t> steps_;
    std::vector<std::vector<T>> first_, second_;
};

// torch.optim.AdamW: Adam with decoupled weight decay, param *= 1 - lr * weight_decay
template <typename T>
class AdamW : public Adam<T> {
 public:
    AdamW(std::vector<Parameter<T>*> params, double lr = 1e-3, double beta1 = 0.9,
          double beta2 = 0.999, double eps = 1e-8, double weight_decay = 1e-2);
};

// ---- learning-rate schedules ---------------------------------------------------------------
// torch.optim.lr_scheduler's, as cnnbp.optim.lr_scheduler in Python: call step() once per
// epoch, after that epoch's optimizer steps; the optimizer's lr follows. The rates come from
// torch's own recurrences (the same double arithmetic as Python's), so they are equal step
// for step. The optimizer must outlive the schedule.
template <typename T>
class LRScheduler {
 public:
    explicit LRScheduler(Optimizer<T>& optimizer)
        : optimizer_(optimizer), base_lr_(optimizer.lr()) {}
    virtual ~LRScheduler() = default;
    void step() {
        ++last_epoch_;
        optimizer_.set_lr(next_lr(optimizer_.lr()));
    }
    double get_last_lr() const { return optimizer_.lr(); }
    int64_t last_epoch() const { return last_epoch_; }
    double base_lr() const { return base_lr_; }

 protected:
    // the rate after epoch last_epoch_ from the rate before it
    virtual double next_lr(double lr) const = 0;
    Optimizer<T>& optimizer_;
    double base_lr_;
    int64_t last_epoch_ = 0;
};

// lr *= gamma every step_size epochs (step_size >= 1)
template <typename T>
class StepLR : public LRScheduler<T> {
 public:
    StepLR(Optimizer<T>& optimizer, int64_t step_size, double gamma = 0.1)
        : LRScheduler<T>(optimizer), step_size_(step_size), gamma_(gamma) {
        if (step_size < 1)
            throw std::invalid_argument("[StepLR] step_size: expected an int >= 1, got " +
                                        std::to_string(step_size));
    }

 protected:
    double next_lr(double lr) const override {
        return this->last_epoch_ % step_size_ == 0 ? lr * gamma_ : lr;
    }

 private:
    int64_t step_size_;
    double gamma_;
};

// lr from its initial value down to eta_min along half a cosine over T_max epochs (>= 1):
// lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2
template <typename T>
class CosineAnnealingLR : public LRScheduler<T> {
 public:
    CosineAnnealingLR(Optimizer<T>& optimizer, int64_t T_max, double eta_min = 0.0)
        : LRScheduler<T>(optimizer), T_max_(T_max), eta_min_(eta_min) {
        if (T_max < 1)
            throw std::invalid_argument("[CosineAnnealingLR] T_max: expected an int >= 1, got " +
                                        std::to_string(T_max));
    }

 protected:
    double next_lr(double lr) const override {
        const double pi = 3.141592653589793;  // Python's math.pi
        const int64_t t = this->last_epoch_, n = T_max_;
        const double low = eta_min_;
        if (((t - 1 - n) % (2 * n) + 2 * n) % (2 * n) == 0)  // Python's % (never negative)
            return lr + (this->base_lr_ - low) * (1 - std::cos(pi / double(n))) / 2;
        return (1 + std::cos(pi * double(t) / double(n))) /
                   (1 + std::cos(pi * double(t - 1) / double(n))) * (lr - low) +
               low;
    }

 private:
    int64_t T_max_;
    double eta_min_;
};

// A model's parameters, gradients or floating buffers as one flat buffer of T: every tensor's
// elements one after another, in named_parameters() (named_buffers()) order, so that one
// collective call moves all of them (data-parallel training: pack the gradients, Allreduce
// the buffer, unpack; examples/cpp/mpi_allreduce.cpp). `size` is the buffer's length and
// must be flat_size's (else std::invalid_argument "[pack_gradients] flat: expected 1234
// elements, got 1000"). A parameter without a gradient packs as zeros, and unpacking leaves
// it without one. The buffers are BatchNorm2d's running statistics; the int64 counters
// (num_batches_tracked) are not in the flat buffer.
template <typename T>
int64_t flat_size(Layer<T>& model);  // the parameters' elements
template <typename T>
int64_t flat_buffer_size(Layer<T>& model);  // the floating buffers' elements
template <typename T>
void pack_gradients(T* flat, int64_t size, Layer<T>& model);
template <typename T>
void unpack_gradients(Layer<T>& model, const T* flat, int64_t size);
template <typename T>
void pack_parameters(T* flat, int64_t size, Layer<T>& model);
template <typename T>
void unpack_parameters(Layer<T>& model, const T* flat, int64_t size);
template <typename T>
void pack_buffers(T* flat, int64_t size, Layer<T>& model);
template <typename T>
void unpack_buffers(Layer<T>& model, const T* flat, int64_t size);

// zero_grad, forward, loss, backward, optimizer step: returns the loss. The target is a
// tensor of T for the BCE losses, of class indices (int64) or probabilities (T) for
// CrossEntropyLoss and of class indices for NLLLoss. A loss of reduction 'none' is refused (its
// backward needs a gradient per element, as torch's backward() needs a scalar).
// The model, loss and optimizer are held for the whole step (InUse). The model keeps a
// reference to input until its backward, so a temporary input does not compile.
template <typename T, typename Target>
double train_step(Sequential<T>& model, const Tensor<T>& input, const Tensor<Target>& target,
                  Loss<T>& loss, Optimizer<T>& optimizer);
template <typename T, typename Target>
double train_step(Sequential<T>& model, Tensor<T>&& input, const Tensor<Target>& target,
                  Loss<T>& loss, Optimizer<T>& optimizer) = delete;

}  // namespace cnnbp::nn

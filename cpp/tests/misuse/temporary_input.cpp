// Code that must not compile: a layer, model or train_step keeps a reference to its input
// (and a layer to its grad_output) until the backward, so handing it a temporary would leave
// it pointing at freed memory. CNNBP_MISUSE picks one misuse (1: forward, 2: backward,
// 3: train_step); 0 is the same code with named tensors, which must compile, so a failure
// of the others is the deleted overload's and not a mistake in this file.
#include "cnnbp/nn.hpp"

using namespace cnnbp::nn;

double misuse() {
    Sequential<float> model({std::make_shared<Linear<float>>(3, 2)});
    CrossEntropyLoss<float> loss;
    SGD<float> sgd(model.parameters(), 0.1);
    const Tensor<float> x({4, 3}), dy({4, 2});
    const Tensor<int64_t> labels({4});
#if CNNBP_MISUSE == 1
    model.forward(Tensor<float>({4, 3}));
#elif CNNBP_MISUSE == 2
    model.forward(x);
    model.backward(Tensor<float>({4, 2}));
#elif CNNBP_MISUSE == 3
    return train_step(model, Tensor<float>({4, 3}), labels, loss, sgd);
#else
    model.forward(x);
    model.backward(dy);
    return train_step(model, x, labels, loss, sgd);
#endif
    return 0;
}

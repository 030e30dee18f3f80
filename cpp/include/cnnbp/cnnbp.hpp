// cnnbp/cnnbp.hpp -- everything: shapes and validation, then one header per op family.
#pragma once

#include "cnnbp/activation.hpp"
#include "cnnbp/adaptive_pool2d.hpp"
#include "cnnbp/batch_norm2d.hpp"
#include "cnnbp/conv2d.hpp"
#include "cnnbp/dropout.hpp"
#include "cnnbp/errors.hpp"
#include "cnnbp/json.hpp"
#include "cnnbp/linear.hpp"
#include "cnnbp/loss.hpp"
#include "cnnbp/model_file.hpp"
#include "cnnbp/nn.hpp"
#include "cnnbp/optim.hpp"
#include "cnnbp/pool2d.hpp"
#include "cnnbp/registry.hpp"
#include "cnnbp/shapes.hpp"
#include "cnnbp/threads.hpp"

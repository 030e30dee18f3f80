// The validation layer throws std::invalid_argument "[op] what: expected ..., got ...".
#include <limits>

#include "check.hpp"
#include "cnnbp/shapes.hpp"
#include "cnnbp/threads.hpp"

using namespace cnnbp;

TEST_CASE("validation: output_size") {
    CHECK(output_size(6, 3, 1, 0) == 4);
    CHECK(output_size(4, 2, 2, 0) == 2);
    CHECK(output_size(5, 2, 2, 0) == 2);  // floored
    CHECK(output_size(5, 3, 2, 1) == 3);
    CHECK(output_size(2, 5, 1, 0) < 1);  // window larger than the input
    CHECK_THROWS(output_size(5, 3, 0, 0), "[output_size] stride: expected >= 1, got 0");
    CHECK_THROWS(output_size(5, 0, 1, 0), "[output_size] kernel: expected >= 1, got 0");
    CHECK_THROWS(output_size(5, 3, 1, -1), "[output_size] padding: expected >= 0, got -1");
}

TEST_CASE("validation: output_size with dilation and ceil_mode, torch's rule") {
    CHECK(output_size(9, 3, 2, 1, 2) == 4);         // extent 5: floor((11 - 5) / 2) + 1
    CHECK(output_size(4, 3, 1, 0, 2) < 1);          // extent 5 > 4
    CHECK(output_size(7, 2, 2, 0, 1, true) == 4);   // ceil(5 / 2) + 1
    CHECK(output_size(7, 2, 2, 0, 1, false) == 3);  // floor
    CHECK(output_size(6, 2, 2, 0, 1, true) == 3);   // exact: ceil_mode changes nothing
    CHECK(output_size(5, 2, 2, 1, 1, true) == 3);   // a 4th window would start at 6 >= 5 + 1
    CHECK(output_size(3, 4, 2, 0, 1, true) == 1);   // ceil fits a window 1 past the input
    CHECK(output_size(3, 5, 2, 0, 1, true) < 1);    // but not 2
    CHECK(output_size(3, 3, 2, 1, 2, true) == 1);
    CHECK(output_size(0, 1, 2, 0, 1, true) == 0);  // torch drops a window starting at 0 >= 0
    CHECK_THROWS(output_size(5, 3, 1, 0, 0), "[output_size] dilation: expected >= 1, got 0");
    const int64_t max = std::numeric_limits<int64_t>::max();
    CHECK(output_size(5, 3, 1, 0, max) < 1);  // a saturated extent, no overflow
    CHECK(output_size(5, 3, max, 0, max, true) < 2);
}

TEST_CASE("validation: conv2d shapes and parameters") {
    CHECK_THROWS(conv2d_dims({1, 1, 6, 6}, {3, 3}, nullptr, {}),
                 "[conv2d] weight: expected 4 dims (K, C / groups, R, S), got shape (3, 3)");
    CHECK_THROWS(conv2d_dims({6, 6}, {1, 1, 3, 3}, nullptr, {}),
                 "[conv2d] input: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape "
                 "(6, 6)");
    const auto unbatched = conv2d_dims({1, 6, 6}, {2, 1, 3, 3}, nullptr, {});
    CHECK(!unbatched.batched && unbatched.N == 1 &&
          conv2d_output_shape(unbatched) == Shape({2, 4, 4}));
    CHECK_THROWS(conv2d_check_doutput(unbatched, {1, 2, 4, 4}),
                 "[conv2d_backward] doutput: expected shape (2, 4, 4)");
    CHECK_THROWS(conv2d_dims({1, 2, 6, 6}, {1, 3, 3, 3}, nullptr, {}),
                 "[conv2d] weight: expected 2 input channels");
    Shape bias{2};
    CHECK_THROWS(conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, &bias, {}),
                 "[conv2d] bias: expected shape (1,), got shape (2,)");
    CHECK_THROWS(conv2d_dims({1, 1, 2, 2}, {1, 1, 3, 3}, nullptr, {}),
                 "[conv2d] input: expected padded size (2, 2) >= kernel size (3, 3)");
    CHECK_THROWS(conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, {0, 1, 0, 0}),
                 "[conv2d] stride: expected >= 1, got 0");
    CHECK_THROWS(conv2d_dims({1, 0, 6, 6}, {1, 1, 3, 3}, nullptr, {}),
                 "[conv2d] input: expected every dim but the batch >= 1, got shape (1, 0, 6, 6)");
    CHECK(conv2d_dims({0, 1, 6, 6}, {1, 1, 3, 3}, nullptr, {}).P == 4);  // an empty batch
    Conv2dParams groups;
    groups.groups = 4;
    CHECK_THROWS(
        conv2d_dims({1, 6, 6, 6}, {4, 1, 3, 3}, nullptr, groups),
        "[conv2d] groups: expected a divisor of the input channels 6 (input (1, 6, 6, 6)), "
        "got 4");
    CHECK_THROWS(conv2d_dims({1, 8, 6, 6}, {6, 2, 3, 3}, nullptr, groups),
                 "[conv2d] weight: expected out channels (dim 0) divisible by groups 4, got shape "
                 "(6, 2, 3, 3)");
    CHECK_THROWS(conv2d_dims({1, 8, 6, 6}, {8, 8, 3, 3}, nullptr, groups),
                 "[conv2d] weight: expected 2 input channels (dim 1) to match input (1, 8, 6, 6) "
                 "and groups 4, got shape (8, 8, 3, 3)");
    groups.groups = 0;
    CHECK_THROWS(conv2d_dims({1, 8, 6, 6}, {8, 8, 3, 3}, nullptr, groups),
                 "[conv2d] groups: expected >= 1, got 0");
    Conv2dParams dilated;
    dilated.dilation_h = 3;
    CHECK_THROWS(conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, dilated),
                 "[conv2d] input: expected padded size (6, 6) >= dilated kernel size (7, 3)");
    dilated.dilation_w = 0;
    CHECK_THROWS(conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, dilated),
                 "[conv2d] dilation: expected >= 1, got 0");
    Conv2dParams same;
    same.same_padding = true;
    same.dilation_w = 3;
    const auto s = conv2d_dims({1, 1, 5, 6}, {1, 1, 4, 2}, nullptr, same);  // torch's split
    CHECK(s.P == 5 && s.Q == 6 && s.params.pad_h == 1 && s.pad_bottom == 2 && s.params.pad_w == 1 &&
          s.pad_right == 2);
    same.stride_w = 2;
    CHECK_THROWS(conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, same),
                 "[conv2d] padding: expected stride 1 with padding='same' (torch's rule), got "
                 "stride (1, 2)");
    const auto d = conv2d_dims({2, 1, 6, 6}, {4, 1, 3, 3}, nullptr, {});
    CHECK_THROWS(conv2d_check_doutput(d, {2, 4, 4, 3}),
                 "[conv2d_backward] doutput: expected shape (2, 4, 4, 4)");
}

TEST_CASE("validation: pool2d and indices") {
    CHECK_THROWS(pool2d_dims("max_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 2, 0}),
                 "[max_pool2d] padding: expected at most half the kernel size");
    CHECK_THROWS(pool2d_dims("max_pool2d", {1, 1, 1, 4}, {2, 2, 2, 2, 0, 0}),
                 "[max_pool2d] input: expected padded size");
    CHECK_THROWS(max_pool2d_backward_dims({1, 1, 2, 2}, {1, 1, 2, 3}, {1, 1, 4, 4}),
                 "[max_pool2d_backward] indices: expected shape (1, 1, 2, 2)");
    CHECK_THROWS(max_pool2d_backward_dims({1, 2, 2, 2}, {1, 2, 2, 2}, {1, 1, 4, 4}),
                 "[max_pool2d_backward] doutput: expected (N, C) = (1, 1)");
    const std::vector<int64_t> bad{0, 16};
    CHECK_THROWS(
        check_pool_indices(bad.data(), 2, 16),
        "indices: expected values in [0, 16) (flat positions in an H*W input plane), got 16");
    const std::vector<int64_t> negative{-1};
    CHECK_THROWS(check_pool_indices(negative.data(), 1, 16), "got -1");
}

TEST_CASE("validation: pool2d options") {
    using cnnbp_test::with_options;
    CHECK_THROWS(
        pool2d_dims("max_pool2d", {1, 1, 4, 4}, with_options({2, 2, 2, 2, 0, 0}, 0, false)),
        "[max_pool2d] dilation: expected >= 1, got 0");
    CHECK_THROWS(
        pool2d_dims("max_pool2d", {1, 1, 4, 4}, with_options({3, 3, 1, 1, 0, 0}, 2, false)),
        "[max_pool2d] input: expected padded size (4, 4) >= dilated kernel size (5, 5), "
        "got input shape (1, 1, 4, 4)");
    CHECK_THROWS(pool2d_dims("max_pool2d", {1, 1, 3, 3}, with_options({5, 5, 2, 2, 0, 0}, 1, true)),
                 "[max_pool2d] input: expected padded size (3, 3) + stride - 1 (4, 4) >= kernel "
                 "size (5, 5)");
    CHECK_THROWS(
        pool2d_dims("max_pool2d", {1, 1, 3, 5}, with_options({2, 2, 1, 1, 1, 1}, 4, false)),
        "[max_pool2d] input: expected every window to have a cell inside the input, got "
        "the window of output row 0 with taps -1, 3, ...");
    CHECK_THROWS(pool2d_dims("max_pool2d", {1, 1, 4, 4},
                             with_options({3, 3, 1, 1, 0, 0}, int64_t(1) << 47, false)),
                 "[max_pool2d] dilation: expected a dilated kernel size");
    CHECK_THROWS(pool2d_dims("avg_pool2d", {1, 1, 4, 4},
                             with_options({2, 2, 2, 2, 0, 0}, 1, false, true, 0)),
                 "[avg_pool2d] divisor_override: expected a nonzero int or None, got 0");
    CHECK_THROWS(avg_pool2d_backward_dims({1, 1, 2, 2}, {1, 1, 3, 3},
                                          with_options({2, 2, 2, 2, 0, 0}, 1, false)),
                 "[avg_pool2d_backward] doutput: expected shape (1, 1, 1, 1)");
    const auto ceil = avg_pool2d_backward_dims({1, 1, 2, 2}, {1, 1, 3, 3},
                                               with_options({2, 2, 2, 2, 0, 0}, 1, true));
    CHECK(ceil.P == 2 && ceil.Q == 2 && ceil.params.ceil_mode);
}

TEST_CASE("validation: avg_pool2d shapes and parameters") {
    CHECK_THROWS(pool2d_dims("avg_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 2, 0}),
                 "[avg_pool2d] padding: expected at most half the kernel size (2, 2), got (2, 0)");
    CHECK_THROWS(pool2d_dims("avg_pool2d", {1, 0, 4, 4}, {2, 2, 2, 2, 0, 0}),
                 "[avg_pool2d] input: expected every dim but the batch >= 1, got shape (1, 0, 4, "
                 "4)");
    CHECK(pool2d_output_shape(pool2d_dims("avg_pool2d", {0, 1, 4, 4}, {2, 2, 2, 2, 0, 0})) ==
          Shape({0, 1, 2, 2}));  // an empty batch
    CHECK(pool2d_output_shape(pool2d_dims("avg_pool2d", {3, 4, 4}, {2, 2, 2, 2, 0, 0})) ==
          Shape({3, 2, 2}));  // unbatched
    CHECK_THROWS(avg_pool2d_backward_dims({1, 1, 2, 2}, {1, 4, 4}, {2, 2, 2, 2, 0, 0}),
                 "[avg_pool2d_backward] doutput: expected shape (1, 2, 2) (the forward "
                 "output's), got shape (1, 1, 2, 2)");
    CHECK_THROWS(avg_pool2d_backward_dims({1, 1, 2, 2}, {1, 1, 3, 3}, {5, 5, 1, 1, 0, 0}),
                 "[avg_pool2d_backward] x_shape: expected padded size (3, 3) >= kernel size "
                 "(5, 5), got x_shape (1, 1, 3, 3)");
    CHECK_THROWS(avg_pool2d_backward_dims({1, 1, 2, 3}, {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0}),
                 "[avg_pool2d_backward] doutput: expected shape (1, 1, 2, 2) (the forward "
                 "output's), got shape (1, 1, 2, 3)");
    const auto d = avg_pool2d_backward_dims({2, 3, 2, 2}, {2, 3, 5, 5}, {3, 3, 2, 2, 0, 0});
    CHECK(d.N == 2 && d.C == 3 && d.H == 5 && d.W == 5 && d.P == 2 && d.Q == 2);
}

TEST_CASE("validation: dropout probability") {
    CHECK_THROWS(dropout_params("dropout", -0.5),
                 "[dropout] p: expected a probability in [0, 1], got -0.5");
    CHECK_THROWS(dropout_params("dropout", 1.5), "got 1.5");
    CHECK_THROWS(dropout_params("dropout_backward", 1.1),
                 "[dropout_backward] p: expected a probability in [0, 1], got 1.1");
    CHECK_THROWS(dropout_params("dropout", std::numeric_limits<double>::quiet_NaN()), "got nan");
    CHECK_THROWS(dropout_params("dropout", std::numeric_limits<double>::infinity()), "got inf");
    CHECK(dropout_params("dropout", 0.0).p == 0.0);
    CHECK(dropout_params("dropout", 1.0, 5).seed == 5);
}

TEST_CASE("validation: linear and losses") {
    CHECK_THROWS(linear_dims({2, 3}, {4, 5}, nullptr),
                 "[linear] weight: expected in_features (dim 1) = 3");
    CHECK_THROWS(linear_dims({}, {4, 5}, nullptr), "[linear] input: expected at least 1 dim");
    CHECK_THROWS(check_bce_shapes("binary_cross_entropy", {2, 1}, {2}),
                 "[binary_cross_entropy] target: expected shape (2, 1)");
    const double outside[] = {0.5, 1.5};
    CHECK_THROWS(check_probabilities("binary_cross_entropy", outside, 2),
                 "input: expected probabilities in [0, 1], got 1.5");
    CHECK_THROWS(cross_entropy_dims("cross_entropy", {2, 3}, {3}),
                 "[cross_entropy] labels: expected shape (2,)");
    const int64_t labels[] = {0, 3};
    CHECK_THROWS(check_labels("cross_entropy", labels, 2, 3),
                 "labels: expected class indices in [0, 3), got 3");
}

TEST_CASE("validation: loss options") {
    CHECK(parse_reduction("cross_entropy", "sum") == Reduction::Sum);
    CHECK_THROWS(parse_reduction("binary_cross_entropy", "avg"),
                 "[binary_cross_entropy] reduction: expected 'mean', 'sum' or 'none', got 'avg'");
    CHECK_THROWS(check_expandable("binary_cross_entropy", "weight", {2}, {3, 4}),
                 "[binary_cross_entropy] weight: expected a shape that broadcasts to (3, 4) "
                 "(input's), got shape (2,)");
    CHECK_THROWS(check_expandable("binary_cross_entropy", "weight", {1, 3, 4}, {3, 4}),
                 "got shape (1, 3, 4)");
    check_expandable("binary_cross_entropy", "weight", {3, 1}, {3, 4});  // broadcasts
    CHECK_THROWS(cross_entropy_params("cross_entropy", Reduction::Mean, -100, 1.5),
                 "[cross_entropy] label_smoothing: expected a number in [0, 1], got 1.5");
    CHECK_THROWS(cross_entropy_dims("cross_entropy", {2, 3, 4}, {2, 3}),
                 "[cross_entropy] labels: expected shape (2, 4) (logits' without the class dim)");
    CHECK_THROWS(cross_entropy_dims("cross_entropy", {2, 3, 4}, {2, 3}, true),
                 "[cross_entropy] target: expected shape (2, 3, 4) (logits', class probabilities)");
    const auto dims = cross_entropy_dims("cross_entropy", {2, 3, 4, 5}, {2, 4, 5});
    CHECK(dims.N == 2 && dims.K == 3 && dims.S == 20 && !dims.probabilities);
    CHECK_THROWS(check_class_weight("cross_entropy", dims, {4}),
                 "[cross_entropy] weight: expected shape (3,) (one weight per class)");
    const auto prob_dims = cross_entropy_dims("cross_entropy", {2, 3}, {2, 3}, true);
    CHECK_THROWS(
        check_ignore_index("cross_entropy", prob_dims, CrossEntropyParams{Reduction::Mean, 0, 0}),
        "ignore_index: expected -100 (none) with class probabilities");
    const int64_t labels[] = {0, -100, 2};
    check_labels("cross_entropy", labels, 3, 3);  // -100: the default ignore_index
    CHECK_THROWS(check_labels("cross_entropy", labels, 3, 3, 2),
                 "labels: expected class indices in [0, 3), got -100 at position 1");
    double expanded[6];
    const double row[] = {1, 2, 3};
    expand_to(expanded, {2, 3}, row, {3});
    CHECK_CLOSE(expanded, (std::vector<double>{1, 2, 3, 1, 2, 3}), 0, 0);
    const double column[] = {4, 5};
    expand_to(expanded, {2, 3}, column, {2, 1});
    CHECK_CLOSE(expanded, (std::vector<double>{4, 4, 4, 5, 5, 5}), 0, 0);
}

TEST_CASE("validation: thread count") {
    CHECK_THROWS(set_num_threads(0), "[set_num_threads] n: expected >= 1, got 0");
    CHECK_THROWS(set_num_threads(int64_t(1) << 31),
                 "[set_num_threads] n: expected <= 1024, got 2147483648");
    CHECK_THROWS(set_num_threads(1025), "[set_num_threads] n: expected <= 1024, got 1025");
    const int64_t before = get_num_threads();
    CHECK(before >= 1);
    set_num_threads(1);
    CHECK(get_num_threads() == 1);
    set_num_threads(before);
    CHECK(get_num_threads() == before);
}

TEST_CASE("validation: size arithmetic never overflows") {
    const int64_t max = std::numeric_limits<int64_t>::max();
    CHECK(checked_product({}, 10) == 1);
    CHECK(checked_product({3, 4}, 12) == 12);
    CHECK(checked_product({3, 4}, 11) == -1);
    CHECK(checked_product({max, max, 0}, kMaxElements) == 0);  // a zero anywhere: empty
    CHECK(checked_product({int64_t(1) << 32, int64_t(1) << 32}, max) == -1);  // 2^64
    CHECK(checked_product({max, 2}, max) == -1);
    CHECK(checked_product({2, -3}, max) == -1);
    CHECK(checked_numel("op", "x", {1 << 24, 1 << 24}) == int64_t(1) << 48);
    CHECK_THROWS(checked_numel("op", "x", {1 << 24, (1 << 24) + 1}),
                 "[op] x: expected at most 2^48 elements, got shape (16777216, 16777217)");
    CHECK_THROWS(checked_numel("op", "x", {max, max, max}), "[op] x: expected at most 2^48");
    CHECK_THROWS(checked_numel("op", "x", {2, -3}), "[op] x: expected every dim >= 0, got shape");
    // numel sizes nn.hpp's tensors: 2^32 * (2^32 + 1) must not wrap to 2^32
    CHECK(numel({}) == 1 && numel({3, 0, max}) == 0 && numel({2, 3}) == 6);
    CHECK_THROWS(
        numel({int64_t(1) << 32, (int64_t(1) << 32) + 1}),
        "[numel] shape: expected at most 2^48 elements, got shape (4294967296, 4294967297)");

    // output sizes: padding, kernel and stride at the int64 extremes
    CHECK(output_size(0, max, max, 0) == 0);  // a window that never fits, no overflow
    CHECK(output_size(5, 1, max, 0) == 1);
    CHECK_THROWS(output_size(5, 1, 1, max), "[output_size] padding: expected a padded size");
    CHECK_THROWS(output_size(5, 1, 1, int64_t(1) << 62), "got 5 + 2 * 4611686018427387904");
    CHECK_THROWS(output_size(-1, 1, 1, 0), "[output_size] in_size: expected >= 0, got -1");

    // conv2d: padding whose padded size, output or workspace would not fit
    CHECK_THROWS(conv2d_dims({1, 1, 4, 4}, {1, 1, 3, 3}, nullptr, {1, 1, max, 0}),
                 "[conv2d] padding: expected a padded size");
    CHECK_THROWS(
        conv2d_dims({1, 1, 4, 4}, {1, 1, 3, 3}, nullptr, {1, 1, int64_t(1) << 40, 1 << 20}),
        "[conv2d] output: expected at most 2^48 elements");
    CHECK_THROWS(
        conv2d_dims({1, 1 << 20, 1, 1}, {1, 1 << 20, 1, 1}, nullptr, {1, 1, 1 << 17, 1 << 17}),
        "[conv2d] padding: expected padded planes of at most 2^56 elements");
    CHECK_THROWS(conv2d_dims({1 << 17, 1 << 4, 1 << 8, 1 << 8}, {1 << 12, 1 << 4, 1 << 4, 1 << 4},
                             nullptr, {}),
                 "[conv2d] input: expected at most 2^56 multiply-adds");
    CHECK_THROWS(conv2d_dims({1 << 20, 1 << 20, 1 << 20, 1}, {1, 1 << 20, 1, 1}, nullptr, {}),
                 "[conv2d] input: expected at most 2^48 elements");
    CHECK_THROWS(conv2d_dims({1, 1, 4, 4}, {max, 1, 1, 1}, nullptr, {}),
                 "[conv2d] weight: expected at most 2^48 elements");

    // max_pool2d: 2 * padding, padded size and the windows' cells
    CHECK_THROWS(pool2d_dims("max_pool2d", {1, 1, 4, 4}, {max, max, 1, 1, max / 2, 0}),
                 "[max_pool2d] padding: expected a padded size");
    CHECK_THROWS(pool2d_dims("max_pool2d", {1, 1, 4, 4}, {4, 4, 1, 1, max, 0}),
                 "[max_pool2d] padding: expected at most half the kernel size");
    CHECK_THROWS(pool2d_dims("max_pool2d", {1 << 10, 1 << 10, 1 << 10, 1 << 10},
                             {1 << 10, 1 << 10, 1, 1, 1 << 9, 1 << 9}),
                 "[max_pool2d] kernel_size: expected at most 2^56 window cells");
    CHECK_THROWS(max_pool2d_backward_dims({1, 1, 1, 1}, {1, 1, 1, 1}, {1, 1, max, max}),
                 "[max_pool2d_backward] x_shape: expected at most 2^48 elements");

    // linear: rows times features
    CHECK_THROWS(linear_dims({1 << 30, 1 << 20}, {1 << 10, 1 << 20}, nullptr),
                 "[linear] input: expected at most 2^48 elements");
    CHECK_THROWS(linear_dims({2, 1 << 20}, {1 << 30, 1 << 20}, nullptr),
                 "[linear] weight: expected at most 2^48 elements");
    CHECK_THROWS(linear_dims({1 << 20, 1 << 10}, {1 << 30, 1 << 10}, nullptr),
                 "[linear] output: expected at most 2^48 elements");
    CHECK_THROWS(linear_dims({1 << 24, 1 << 16}, {1 << 20, 1 << 16}, nullptr),
                 "[linear] input: expected at most 2^56 multiply-adds");
    CHECK(linear_dims({0, int64_t(1) << 40, 3}, {2, 3}, nullptr).M == 0);
}

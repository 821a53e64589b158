// dense_detections on CUDA (what it computes: ../detections.h), the batch at once and with no host
// synchronisation:
//  1. scores: the sigmoid of every logit (computed here, as torch.sigmoid's CUDA kernel computes each element; with
//     centerness, FCOS's sqrt(sigmoid(class) * sigmoid(centerness))), or PyTorch's softmax;
//  2. per group set (a level's [B, A_l * C] scores, or all classes' [B, C, A] at once), keys that pack the score's
//     descending_key with the position (kNoCandidate below the threshold), and one at::topk: each group's best
//     topk_candidates, equal scores lower position first (float64 scores: a stable sort of the masked scores);
//  3. every image's candidates in group order, stably sorted by descending score (the candidates that did not pass
//     last), their deltas decoded against their anchors (the decode_boxes kernel, or decode_linear) and clipped;
//  4. NMS of every image at once (postprocess.cuh: per-category masks, one walk per image stopping at
//     detections_per_img), then the kept rows copied to the padded outputs.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../box_coding.h"
#include "../box_math.h"
#include "../detections.h"
#include "../dispatch.h"
#include "../score_candidates.h"
#include "launch.cuh"
#include "postprocess.cuh"

namespace rpn_ops::cuda {
namespace {

RPN_OPS_SIZING(kImagesPerLaunch, kMaxImagesPerLaunch);
RPN_OPS_SIZING(kImagesPerMaskLaunch, 65535);  // grid.z of segment_mask_kernel
constexpr int kPositionBits = 31;
constexpr int64_t kNoCandidate = std::numeric_limits<int64_t>::max();

template <typename S>
__global__ void sigmoid_kernel(const S* __restrict__ logits, int64_t count, S* __restrict__ scores) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    scores[i] = static_cast<S>(sigmoid_of(static_cast<opmath_t<S>>(logits[i])));
  }
}

// FCOS's scores of [rows, classes] logits with one centerness logit per row.
template <typename S>
__global__ void centered_scores_kernel(const S* __restrict__ logits, const S* __restrict__ centerness, int64_t rows,
                                       int64_t classes, S* __restrict__ scores) {
  using A = opmath_t<S>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * classes;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const S class_score = static_cast<S>(sigmoid_of(static_cast<A>(logits[i])));
    const S center_score = static_cast<S>(sigmoid_of(static_cast<A>(centerness[i / classes])));
    scores[i] = static_cast<S>(sqrt(static_cast<A>(centered_product(class_score, center_score))));
  }
}

template <typename T>
__global__ void linear_decode_kernel(const T* __restrict__ codes, const T* __restrict__ boxes, int64_t count,
                                     T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    decode_linear(codes + 4 * i, boxes + 4 * i, out + 4 * i);
  }
}

// The [B, groups, positions] group set whose score (b, g, p) is scores[b * image_stride + g * group_stride +
// p * position_stride]; positions p with p % class_period < first_class are never candidates (softmax's
// background, in a level's anchors x classes).
struct GroupSet {
  int64_t images, groups, positions;
  int64_t image_stride, group_stride, position_stride;
  int64_t class_period, first_class;
};

// Packed: keys (descending_key << 31 | p), kNoCandidate where the score does not pass. Otherwise (float64): the
// score where it passes, -inf where not.
template <typename S>
__global__ void group_keys_kernel(const S* __restrict__ scores, GroupSet set, S threshold, bool packed,
                                  int64_t* __restrict__ keys, double* __restrict__ values) {
  using A = opmath_t<S>;
  const int64_t count = set.images * set.groups * set.positions;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t p = i % set.positions, g = i / set.positions % set.groups, b = i / (set.positions * set.groups);
    const S score = scores[b * set.image_stride + g * set.group_stride + p * set.position_stride];
    const bool passes = p % set.class_period >= set.first_class && static_cast<A>(score) > static_cast<A>(threshold);
    if (packed) {
      keys[i] = passes ? static_cast<int64_t>(descending_key(static_cast<float>(score))) << kPositionBits | p
                       : kNoCandidate;
    } else {
      values[i] = passes ? static_cast<double>(score) : -std::numeric_limits<double>::infinity();
    }
  }
}

// The best `limit` positions of each group of the set, [B, groups, limit], and whether each is a candidate.
template <typename S>
std::tuple<at::Tensor, at::Tensor> best_of_groups(const at::Tensor& scores, const GroupSet& set, int64_t offset,
                                                  int64_t limit, double score_thresh) {
  const bool packed = scores.scalar_type() != at::kDouble;
  const auto options = scores.options();
  const int64_t count = set.images * set.groups * set.positions;
  at::Tensor keys =
      at::empty({set.images, set.groups, set.positions}, options.dtype(packed ? at::kLong : at::kDouble));
  launch<group_keys_kernel<S>>(blocks_for(count), kThreads, 0, scores.data_ptr<S>() + offset, set,
                               to<S>(score_thresh), packed, packed ? keys.data_ptr<int64_t>() : nullptr,
                               packed ? nullptr : keys.data_ptr<double>());
  if (packed) {
    const at::Tensor best = std::get<0>(at::topk(keys, limit, /*dim=*/-1, /*largest=*/false, /*sorted=*/true));
    return {best.bitwise_and((int64_t{1} << kPositionBits) - 1), best.ne(kNoCandidate)};
  }
  auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  return {order.narrow(-1, 0, limit), sorted.narrow(-1, 0, limit).ne(-std::numeric_limits<double>::infinity())};
}

// The anchors of the [n] anchor indices, from the anchor specification.
struct GridLevels {
  int count;
  AnchorLevel level[kMaxLevels];
};

template <typename T>
__global__ void grid_anchor_kernel(const int64_t* __restrict__ anchor_index, int64_t count, GridLevels grid,
                                   const T* __restrict__ cells, T* __restrict__ anchors) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int l = grid.count - 1;
    while (l > 0 && anchor_index[i] < grid.level[l].first_anchor) --l;
    anchor_at(grid.level[l], anchor_index[i], cells, anchors + 4 * i);
  }
}

template <typename S>
__global__ void clip_kernel(S* __restrict__ boxes, int64_t per_image, ImageSizes sizes) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < sizes.images * per_image;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t local = i / per_image;
    S* box = boxes + 4 * ((sizes.first_image + local) * per_image + i % per_image);
    const S x_max = to<S>(static_cast<double>(sizes.width[local]));
    const S y_max = to<S>(static_cast<double>(sizes.height[local]));
    box[0] = clamp_to(box[0], x_max), box[1] = clamp_to(box[1], y_max);
    box[2] = clamp_to(box[2], x_max), box[3] = clamp_to(box[3], y_max);
  }
}

// Row e < kept_count[b] of image b's output is its kept row kept[b, e] (of the [B, N] candidates).
template <typename S, typename O>
__global__ void gather_kept_kernel(const S* __restrict__ boxes, const O* __restrict__ scores,
                                   const int64_t* __restrict__ labels, const int64_t* __restrict__ kept,
                                   const int64_t* __restrict__ kept_count, int64_t images, int64_t candidates,
                                   int64_t limit, int64_t detections, S* __restrict__ out_boxes,
                                   O* __restrict__ out_scores, int64_t* __restrict__ out_labels,
                                   int64_t* __restrict__ counts) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < images * limit;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / limit, e = i % limit;
    if (e == 0) counts[b] = kept_count[b];
    if (e >= kept_count[b]) continue;
    const int64_t row = b * candidates + kept[i], out = b * detections + e;
    for (int c = 0; c < 4; ++c) out_boxes[4 * out + c] = boxes[4 * row + c];
    out_scores[out] = scores[row];
    out_labels[out] = labels[row];
  }
}

// logits: [B, A, C], contiguous; centerness: [B, A] contiguous, for FCOS's scores.
at::Tensor activation_scores(const at::Tensor& logits, const at::Tensor& centerness, Activation activation) {
  if (activation == Activation::kSoftmax) return at::softmax(logits, -1);
  at::Tensor scores = at::empty_like(logits);
  visit_float_type(logits.scalar_type(), [&](auto tag) {
    using S = typename decltype(tag)::type;
    if (centerness.defined()) {
      launch<centered_scores_kernel<S>>(blocks_for(logits.numel()), kThreads, 0, logits.data_ptr<S>(),
                                        centerness.data_ptr<S>(), logits.size(0) * logits.size(1), logits.size(2),
                                        scores.data_ptr<S>());
    } else {
      launch<sigmoid_kernel<S>>(blocks_for(logits.numel()), kThreads, 0, logits.data_ptr<S>(), logits.numel(),
                                scores.data_ptr<S>());
    }
  });
  return scores;
}

at::Tensor decode_linear_boxes(const at::Tensor& codes, const at::Tensor& boxes) {
  const at::Tensor c = codes.contiguous(), b = boxes.contiguous();
  at::Tensor out = at::empty_like(c);
  visit_float_type(c.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch<linear_decode_kernel<T>>(blocks_for(c.size(0)), kThreads, 0, c.data_ptr<T>(), b.data_ptr<T>(), c.size(0),
                                    out.data_ptr<T>());
  });
  return out;
}

// Every image's candidates in group order: [B, N] flat indices (anchor * C + class) and whether each is one.
std::tuple<at::Tensor, at::Tensor> group_candidates(const at::Tensor& scores, const DetectionLayout& layout,
                                                    double score_thresh) {
  const int64_t images = layout.images, classes = layout.classes, per_image = layout.anchors * classes;
  std::vector<at::Tensor> flat, valid;
  visit_float_type(scores.scalar_type(), [&](auto tag) {
    using S = typename decltype(tag)::type;
    if (layout.per_class) {  // groups = classes from first_class, positions = anchors
      const int64_t groups = layout.groups(), limit = layout.group_limit(0);
      if (groups == 0 || limit == 0) return;
      const GroupSet set{images, groups, layout.anchors, per_image, 1, classes, 1, 0};
      auto [position, passes] = best_of_groups<S>(scores, set, layout.first_class(), limit, score_thresh);
      const at::Tensor group_class = at::arange(layout.first_class(), classes, position.options()).view({1, -1, 1});
      flat.push_back(position.mul(classes).add_(group_class).view({images, -1}));
      valid.push_back(passes.view({images, -1}));
      return;
    }
    for (int64_t l = 0; l < layout.levels(); ++l) {  // one group, positions = the level's anchors x classes
      const int64_t limit = layout.group_limit(l);
      if (limit == 0) continue;
      const GroupSet set{images, 1, layout.group_positions(l), per_image, 0, 1, classes, layout.first_class()};
      auto [position, passes] =
          best_of_groups<S>(scores, set, layout.first_anchor[l] * classes, limit, score_thresh);
      flat.push_back(position.add(layout.first_anchor[l] * classes).view({images, -1}));
      valid.push_back(passes.view({images, -1}));
    }
  });
  if (flat.empty()) {
    return {at::empty({images, 0}, scores.options().dtype(at::kLong)),
            at::empty({images, 0}, scores.options().dtype(at::kBool))};
  }
  return {at::cat(flat, 1), at::cat(valid, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_detections(
    const at::Tensor& class_logits, const at::Tensor& box_regression, at::TensorList anchors,
    at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, double score_thresh, int64_t topk_candidates,
    double nms_thresh, int64_t detections_per_img, at::ArrayRef<double> weights, double bbox_xform_clip,
    c10::string_view activation, c10::string_view topk_per, const std::optional<at::Tensor>& cell_anchors,
    at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes, at::IntArrayRef strides,
    const std::optional<at::Tensor>& centerness, c10::string_view box_coding) {
  const DetectionLayout layout = check_detection_inputs(
      class_logits, box_regression, anchors, image_sizes, num_anchors_per_level, score_thresh, topk_candidates,
      nms_thresh, detections_per_img, weights, bbox_xform_clip, activation, topk_per, cell_anchors, cells_per_level,
      grid_sizes, strides, centerness, box_coding);
  TORCH_CHECK_VALUE(layout.levels() <= kMaxLevels || !cell_anchors.has_value(), "dense_detections on CUDA supports ",
                    "at most ", kMaxLevels, " levels of an anchor specification, got ", layout.levels());
  const DeviceGuard guard(class_logits.device());
  auto [out_boxes, out_scores, out_labels, counts] = empty_detections(class_logits, box_regression, layout);
  const int64_t images = layout.images, classes = layout.classes;
  if (images == 0 || layout.detections == 0 || layout.anchors == 0 || classes == 0) {
    return {out_boxes, out_scores, out_labels, counts};
  }
  const at::Tensor scores = activation_scores(
      class_logits.contiguous(), layout.centered ? centerness_logits(*centerness) : at::Tensor(), layout.activation);
  const auto [grouped_flat, grouped_valid] = group_candidates(scores, layout, score_thresh);
  const int64_t candidates = grouped_flat.size(1);
  if (candidates == 0) return {out_boxes, out_scores, out_labels, counts};

  // Each image's candidates by descending score, stably (group order among equal scores), the others last.
  const at::Tensor grouped_scores = scores.view({images, -1}).gather(1, at::where(grouped_valid, grouped_flat, 0));
  const double below_all = -std::numeric_limits<double>::infinity();  // scores are >= 0 (or NaN, never valid)
  const at::Tensor order = std::get<1>(
      at::sort(at::where(grouped_valid, grouped_scores, below_all), /*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor valid = grouped_valid.gather(1, order).contiguous();
  const at::Tensor flat = at::where(valid, grouped_flat.gather(1, order), 0);
  const at::Tensor candidate_scores = grouped_scores.gather(1, order).contiguous();
  const at::Tensor labels = flat.remainder(classes).contiguous();
  const at::Tensor anchor_index = flat.div(classes, "floor");
  const at::Tensor active = valid.sum(1);  // the candidates come first

  const at::Tensor image_first_row = at::arange(images, anchor_index.options()).mul_(layout.anchors).unsqueeze(1);
  const at::Tensor rows = anchor_index.add(image_first_row).view({-1});
  const at::Tensor codes = box_regression.reshape({images * layout.anchors, 4}).index_select(0, rows);
  at::Tensor candidate_anchors;
  if (cell_anchors.has_value()) {
    const at::Tensor cells = cell_anchors->contiguous();
    candidate_anchors = at::empty({images * candidates, 4}, cells.options());
    GridLevels grid{static_cast<int>(layout.levels()), {}};
    std::copy(layout.anchor_grid.begin(), layout.anchor_grid.end(), grid.level);
    const at::Tensor index = anchor_index.contiguous().view({-1});
    visit_float_type(cells.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch<grid_anchor_kernel<T>>(blocks_for(index.numel()), kThreads, 0, index.data_ptr<int64_t>(), index.numel(),
                                    grid, cells.data_ptr<T>(), candidate_anchors.data_ptr<T>());
    });
  } else if (anchors.size() == 1) {
    candidate_anchors = anchors[0].index_select(0, anchor_index.reshape({-1}));
  } else {
    candidate_anchors = at::stack(anchors).reshape({images * layout.anchors, 4}).index_select(0, rows);
  }
  const at::Tensor reference_boxes = candidate_anchors.to(codes.scalar_type());
  at::Tensor boxes = layout.coding == BoxCoding::kLinear
                         ? decode_linear_boxes(codes, reference_boxes)
                         : decode_detections(codes, reference_boxes, weights, bbox_xform_clip);
  visit_float_type(boxes.scalar_type(), [&](auto tag) {
    using S = typename decltype(tag)::type;
    for (int64_t first = 0; first < images; first += kImagesPerLaunch) {
      const ImageSizes sizes = image_sizes_from(layout.heights, layout.widths, first, kImagesPerLaunch);
      launch<clip_kernel<S>>(blocks_for(sizes.images * candidates), kThreads, 0, boxes.data_ptr<S>(), candidates,
                             sizes);
    }
  });

  // NMS: each image one segment of `candidates` rows.
  const int64_t col_blocks = ceil_div(candidates, kBlockBits);
  Levels segments{};
  segments.count = 1;
  segments.selected_per_image = candidates;
  segments.selected[0] = candidates;
  segments.col_blocks[0] = col_blocks;
  segments.mask_per_image = candidates * col_blocks;
  TORCH_CHECK_VALUE(static_cast<double>(segments.mask_per_image) * images * 8 <= 4e9, "dense_detections on CUDA ",
                    "needs ", segments.mask_per_image * images * 8, " bytes of NMS masks (images x candidates^2 / 8, ",
                    candidates, " candidates per image); lower topk_candidates or split the batch");
  at::Tensor mask = at::empty({images * segments.mask_per_image}, class_logits.options().dtype(at::kLong));
  auto* mask_words = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  const auto nms_type = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor nms_boxes = boxes.to(nms_type);
  for (int64_t first = 0; first < images; first += kImagesPerMaskLaunch) {
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(col_blocks),
                    static_cast<unsigned>(std::min<int64_t>(kImagesPerMaskLaunch, images - first)));
    if (nms_type == at::kDouble) {
      launch<segment_mask_kernel<double>>(grid, kBlockBits, 0, nms_boxes.data_ptr<double>(),
                                          labels.data_ptr<int64_t>(), active.data_ptr<int64_t>(), segments,
                                          nms_thresh, first, mask_words);
    } else {
      launch<segment_mask_kernel<float>>(grid, kBlockBits, 0, nms_boxes.data_ptr<float>(),
                                         labels.data_ptr<int64_t>(), active.data_ptr<int64_t>(), segments,
                                         threshold_for<float>(nms_thresh), first, mask_words);
    }
  }
  const int64_t limit = std::min(layout.detections, candidates);
  at::Tensor kept = at::empty({images, limit}, mask.options());
  at::Tensor kept_count = at::empty({images}, mask.options());
  launch<segment_walk_kernel>(static_cast<unsigned>(images), kThreads, col_blocks * 8, mask_words,
                              valid.data_ptr<bool>(), active.data_ptr<int64_t>(), segments, limit,
                              kept.data_ptr<int64_t>(), kept_count.data_ptr<int64_t>());
  visit_float_type(boxes.scalar_type(), [&](auto box_tag) {
    visit_float_type(candidate_scores.scalar_type(), [&](auto score_tag) {
      using S = typename decltype(box_tag)::type;
      using O = typename decltype(score_tag)::type;
      launch<gather_kept_kernel<S, O>>(blocks_for(images * limit), kThreads, 0, boxes.data_ptr<S>(),
                                       candidate_scores.data_ptr<O>(), labels.data_ptr<int64_t>(),
                                       kept.data_ptr<int64_t>(), kept_count.data_ptr<int64_t>(), images, candidates,
                                       limit, layout.detections, out_boxes.data_ptr<S>(), out_scores.data_ptr<O>(),
                                       out_labels.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
    });
  });
  return {out_boxes, out_scores, out_labels, counts};
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("dense_detections", TORCH_FN(dense_detections));
}

}  // namespace rpn_ops::cuda

// CUDA proposal generation, the CPU kernel's steps on the GPU with no host synchronisation until the
// per-image outputs are split (none at all for generate_proposals_padded, which CUDA graphs can capture):
//  1. per level, the top pre_nms_top_n anchors of every image by one at::topk over keys that pack the logit's
//     descending_key with the anchor index, so equal logits rank the lower index first (float64 logits: a
//     stable sort);
//  2. sigmoid and decode of the selected anchors only (PyTorch's sigmoid, the decode_boxes kernel);
//  3. clip and filter (a kernel over the selected boxes), then NMS of every (image, level) segment at once:
//     overlap masks of 64-box blocks, one block per segment walking its mask in score order and stopping at
//     post_nms_top_n kept;
//  4. a merge kernel: each kept box finds its output position by binary searches in the other levels.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../box_coding.h"
#include "../box_math.h"
#include "../checks.h"
#include "../dispatch.h"
#include "../proposals_checks.h"
#include "launch.cuh"
#include "postprocess.cuh"

namespace rpn_ops::cuda {
namespace {

RPN_OPS_SIZING(kImagesPerLaunch, kMaxImagesPerLaunch);
RPN_OPS_SIZING(kSegmentsPerLaunch, 65535);  // (image, level) segments per segment_mask_kernel launch: grid.z
constexpr int64_t kIndexBits = 31;

// (descending_key << 31) | index: ascending order is descending logit, then ascending index.
template <typename L>
__global__ void rank_keys_kernel(const L* __restrict__ logits, int64_t images, int64_t total, int64_t first,
                                 int64_t count, int64_t* __restrict__ keys) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= images * count) return;
  const int64_t b = i / count, j = i - b * count;
  const uint32_t key = descending_key(static_cast<float>(logits[b * total + first + j]));
  keys[i] = static_cast<int64_t>(key) << kIndexBits | j;
}

// Clips each selected box to its image and flags the boxes that pass the size and score filters.
template <typename S, typename O>
__global__ void clip_filter_kernel(S* __restrict__ boxes, const O* __restrict__ scores, int64_t per_image,
                                   ImageSizes sizes, S min_size, O score_thresh, bool* __restrict__ valid) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= sizes.images * per_image) return;
  const int64_t local = i / per_image;
  const int64_t row = (sizes.first_image + local) * per_image + i % per_image;
  const S x_max = to<S>(static_cast<double>(sizes.width[local]));
  const S y_max = to<S>(static_cast<double>(sizes.height[local]));
  S* box = boxes + 4 * row;
  box[0] = clamp_to(box[0], x_max), box[1] = clamp_to(box[1], y_max);
  box[2] = clamp_to(box[2], x_max), box[3] = clamp_to(box[3], y_max);
  const S w = box[2] - box[0], h = box[3] - box[1];
  using A = opmath_t<S>;
  valid[row] = static_cast<A>(w) >= static_cast<A>(min_size) && static_cast<A>(h) >= static_cast<A>(min_size) &&
               static_cast<opmath_t<O>>(scores[row]) >= static_cast<opmath_t<O>>(score_thresh);
}

// Each kept box's output position: its place in its level plus, in every other level, the kept boxes ranked
// before it (higher score, or equal score and lower level); kept scores fall along each level.
template <typename S, typename O>
__global__ void merge_kernel(const S* __restrict__ boxes, const O* __restrict__ scores, Levels levels,
                             const int64_t* __restrict__ kept, const int64_t* __restrict__ kept_count, int64_t limit,
                             int64_t post_nms_top_n, S* __restrict__ out_boxes, O* __restrict__ out_scores,
                             int64_t* __restrict__ counts) {
  using A = opmath_t<O>;
  const int64_t image = blockIdx.x / levels.count;
  const int level = blockIdx.x % levels.count;
  const int64_t image_first = image * levels.selected_per_image;
  auto score_of = [&](int l, int64_t e) {
    return static_cast<A>(scores[image_first + levels.first_selected[l] + kept[(image * levels.count + l) * limit + e]]);
  };
  if (level == 0 && threadIdx.x == 0) {
    int64_t total = 0;
    for (int l = 0; l < levels.count; ++l) total += kept_count[image * levels.count + l];
    counts[image] = std::min(total, post_nms_top_n);
  }
  for (int64_t e = threadIdx.x; e < kept_count[blockIdx.x]; e += blockDim.x) {
    const A score = score_of(level, e);
    int64_t position = e;
    for (int l = 0; l < levels.count; ++l) {
      if (l == level) continue;
      int64_t lo = 0, hi = kept_count[image * levels.count + l];  // first entry not ranked before this box
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        const A other = score_of(l, mid);
        if (other > score || (other == score && l < level)) lo = mid + 1; else hi = mid;
      }
      position += lo;
    }
    if (position >= post_nms_top_n) continue;
    const int64_t row = image_first + levels.first_selected[level] + kept[blockIdx.x * limit + e];
    for (int c = 0; c < 4; ++c) out_boxes[(image * post_nms_top_n + position) * 4 + c] = boxes[4 * row + c];
    out_scores[image * post_nms_top_n + position] = scores[row];
  }
}

// [B, K] indices within the image of each level's top anchors.
at::Tensor select_anchors(const at::Tensor& logits, const ProposalLayout& layout) {
  const int64_t images = layout.images, total = layout.total_anchors;
  at::Tensor top_index = at::empty({images, layout.total_selected}, logits.options().dtype(at::kLong));
  for (int64_t l = 0; l < layout.levels(); ++l) {
    const int64_t k = layout.selected[l], count = layout.anchors[l];
    if (k == 0 || images == 0) continue;
    at::Tensor order;
    if (logits.scalar_type() == at::kDouble) {
      order = std::get<1>(at::sort(logits.narrow(1, layout.first_anchor[l], count), /*stable=*/true, /*dim=*/1,
                                   /*descending=*/true)).narrow(1, 0, k);
    } else {
      at::Tensor keys = at::empty({images, count}, logits.options().dtype(at::kLong));
      visit_float_type(logits.scalar_type(), [&](auto tag) {
        using L = typename decltype(tag)::type;
        launch<rank_keys_kernel<L>>(static_cast<unsigned>(ceil_div(images * count, kThreads)), kThreads, 0,
                                    logits.data_ptr<L>(), images, total, layout.first_anchor[l], count,
                                    keys.data_ptr<int64_t>());
      });
      order = std::get<0>(at::topk(keys, k, /*dim=*/1, /*largest=*/false, /*sorted=*/true))
                  .bitwise_and((int64_t{1} << kIndexBits) - 1);
    }
    top_index.narrow(1, layout.first_selected[l], k).copy_(order.add(layout.first_anchor[l]));
  }
  return top_index;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> padded_proposals(
    const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas, at::TensorList anchors,
    at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
    int64_t post_nms_top_n, double nms_thresh, double score_thresh, double min_size,
    const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
    at::IntArrayRef strides, bool float32_exp) {
  const ProposalLayout layout =
      check_proposal_inputs(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                            post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors, cells_per_level,
                            grid_sizes, strides);
  TORCH_CHECK_VALUE(layout.levels() <= kMaxLevels, "generate_proposals on CUDA supports at most ", kMaxLevels,
                    " levels, got ", layout.levels());
  const DeviceGuard guard(objectness.device());
  const int64_t images = layout.images, total = layout.total_anchors, per_image = layout.total_selected;
  const auto box_type = proposal_box_type(pred_bbox_deltas, float32_exp);
  at::Tensor out_boxes = at::zeros({images, post_nms_top_n, 4}, pred_bbox_deltas.options().dtype(box_type));
  at::Tensor out_scores = at::zeros({images, post_nms_top_n}, objectness.options());
  at::Tensor counts = at::zeros({images}, objectness.options().dtype(at::kLong));
  if (images == 0 || per_image == 0 || post_nms_top_n == 0) return {out_boxes, out_scores, counts};

  const at::Tensor logits = objectness.reshape({images, total}).contiguous();  // rank_keys_kernel reads it flat
  const at::Tensor top_index = select_anchors(logits, layout);
  const at::Tensor scores = logits.gather(1, top_index).sigmoid().reshape({-1});  // torchvision's [B, K] sigmoid
  const at::Tensor flat_index =
      top_index.add(at::arange(images, top_index.options()).mul_(total).unsqueeze(1)).reshape({-1});
  const at::Tensor codes = pred_bbox_deltas.reshape({images * total, 4}).index_select(0, flat_index);
  at::Tensor selected_anchors;
  if (cell_anchors.has_value()) {
    selected_anchors = at::empty({images * per_image, 4}, cell_anchors->options());
    const at::Tensor cells = cell_anchors->contiguous();
    // Computed on the host-side layout: one small kernel per level, anchors from their index (anchor_at).
    for (int64_t l = 0; l < layout.levels(); ++l) {
      if (layout.selected[l] == 0) continue;
      const AnchorLevel level = layout.anchor_grid[l];
      const at::Tensor level_index = top_index.narrow(1, layout.first_selected[l], layout.selected[l]);
      at::Tensor in_level = level_index.sub(level.first_anchor);
      const int64_t position_count = level.cells;
      const at::Tensor position = in_level.div(position_count, "floor");
      const at::Tensor cell = in_level.sub(position.mul(position_count)).add(level.first_cell);
      const at::Tensor shift_x = position.remainder(level.grid_width).mul(level.stride_x);
      const at::Tensor shift_y = position.div(level.grid_width, "floor").mul(level.stride_y);
      const at::Tensor shifts = at::stack({shift_x, shift_y, shift_x, shift_y}, -1).to(cells.scalar_type());
      const at::Tensor level_anchors = shifts.add(cells.index_select(0, cell.reshape({-1})).view(shifts.sizes()));
      selected_anchors.view({images, per_image, 4}).narrow(1, layout.first_selected[l], layout.selected[l])
          .copy_(level_anchors);
    }
  } else if (anchors.size() == 1) {
    selected_anchors = anchors[0].index_select(0, top_index.reshape({-1}));
  } else {
    selected_anchors = at::stack(anchors).reshape({images * total, 4}).index_select(0, flat_index);
  }
  at::Tensor boxes = decode_proposals(codes, selected_anchors.to(pred_bbox_deltas.scalar_type()), float32_exp);
  at::Tensor valid = at::empty({images * per_image}, objectness.options().dtype(at::kBool));

  Levels levels{};
  levels.count = static_cast<int>(layout.levels());
  levels.selected_per_image = per_image;
  int64_t mask_words = 0, max_col_blocks = 0;
  for (int l = 0; l < levels.count; ++l) {
    levels.first_selected[l] = layout.first_selected[l];
    levels.selected[l] = layout.selected[l];
    levels.col_blocks[l] = ceil_div(layout.selected[l], kBlockBits);
    levels.mask_offset[l] = mask_words;
    mask_words += layout.selected[l] * levels.col_blocks[l];
    max_col_blocks = std::max(max_col_blocks, levels.col_blocks[l]);
  }
  levels.mask_per_image = mask_words;
  TORCH_CHECK_VALUE(static_cast<double>(mask_words) * images * 8 <= 4e9, "generate_proposals on CUDA needs ",
                    mask_words * images * 8, " bytes of NMS masks (images x sum of pre_nms_top_n^2 / 8); lower "
                    "pre_nms_top_n or split the batch");
  at::Tensor mask = at::empty({images * mask_words}, objectness.options().dtype(at::kLong));
  const int64_t limit = std::min(post_nms_top_n, per_image);
  at::Tensor kept = at::empty({images * levels.count, limit}, objectness.options().dtype(at::kLong));
  at::Tensor kept_count = at::empty({images * levels.count}, objectness.options().dtype(at::kLong));

  visit_float_type(boxes.scalar_type(), [&](auto box_tag) {
    visit_float_type(scores.scalar_type(), [&](auto score_tag) {
      using S = typename decltype(box_tag)::type;
      using O = typename decltype(score_tag)::type;
      for (int64_t first = 0; first < images; first += kImagesPerLaunch) {
        const ImageSizes sizes = image_sizes_from(layout.heights, layout.widths, first, kImagesPerLaunch);
        launch<clip_filter_kernel<S, O>>(static_cast<unsigned>(ceil_div(sizes.images * per_image, kThreads)),
                                         kThreads, 0, boxes.data_ptr<S>(), scores.data_ptr<O>(), per_image, sizes,
                                         to<S>(min_size), to<O>(score_thresh), valid.data_ptr<bool>());
      }
    });
  });

  const auto nms_type = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor nms_boxes = boxes.to(nms_type);
  auto* mask_words_ptr = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  const int64_t segments = images * levels.count;
  for (int64_t first = 0; first < segments; first += kSegmentsPerLaunch) {  // grid.z holds at most 65535
    const dim3 mask_grid(static_cast<unsigned>(max_col_blocks), static_cast<unsigned>(max_col_blocks),
                         static_cast<unsigned>(std::min<int64_t>(kSegmentsPerLaunch, segments - first)));
    if (nms_type == at::kDouble) {
      launch<segment_mask_kernel<double>>(mask_grid, kBlockBits, 0, nms_boxes.data_ptr<double>(), nullptr, nullptr,
                                          levels, nms_thresh, first, mask_words_ptr);
    } else {
      launch<segment_mask_kernel<float>>(mask_grid, kBlockBits, 0, nms_boxes.data_ptr<float>(), nullptr, nullptr,
                                         levels, threshold_for<float>(nms_thresh), first, mask_words_ptr);
    }
  }
  launch<segment_walk_kernel>(static_cast<unsigned>(segments), kThreads, max_col_blocks * 8,
                              mask_words_ptr, valid.data_ptr<bool>(), nullptr, levels, limit,
                              kept.data_ptr<int64_t>(), kept_count.data_ptr<int64_t>());
  visit_float_type(boxes.scalar_type(), [&](auto box_tag) {
    visit_float_type(scores.scalar_type(), [&](auto score_tag) {
      using S = typename decltype(box_tag)::type;
      using O = typename decltype(score_tag)::type;
      launch<merge_kernel<S, O>>(static_cast<unsigned>(segments), kThreads, 0, boxes.data_ptr<S>(),
                                 scores.data_ptr<O>(), levels, kept.data_ptr<int64_t>(),
                                 kept_count.data_ptr<int64_t>(), limit, post_nms_top_n, out_boxes.data_ptr<S>(),
                                 out_scores.data_ptr<O>(), counts.data_ptr<int64_t>());
    });
  });
  return {out_boxes, out_scores, counts};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> generate_proposals(
    const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas, at::TensorList anchors,
    at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
    int64_t post_nms_top_n, double nms_thresh, double score_thresh, double min_size,
    const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
    at::IntArrayRef strides, bool float32_exp) {
  auto [boxes, scores, counts] =
      padded_proposals(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                       post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors, cells_per_level, grid_sizes,
                       strides, float32_exp);
  const at::Tensor host_counts = counts.cpu();  // the one host synchronisation
  std::vector<at::Tensor> image_boxes, image_scores;
  for (int64_t b = 0; b < boxes.size(0); ++b) {
    const int64_t count = host_counts.data_ptr<int64_t>()[b];
    // Copies, not views of the padded outputs: the schema promises outputs that alias nothing (torch.compile
    // and functionalization rely on it), as the CPU kernel's are.
    image_boxes.push_back(boxes[b].narrow(0, 0, count).clone());
    image_scores.push_back(scores[b].narrow(0, 0, count).clone());
  }
  return {image_boxes, image_scores};
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("generate_proposals", TORCH_FN(generate_proposals));
  m.impl("generate_proposals_padded", TORCH_FN(padded_proposals));
}

}  // namespace rpn_ops::cuda

// Schemas of proposal generation, their shared input checks (proposals_checks.h) and their autocast kernels.
// Kernels: cpu/proposals.cpp, cuda/proposals.cu; fake: rpn_ops/_meta.py.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include "library.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <tuple>

#include "checks.h"
#include "proposals_checks.h"

// Both ops compute torchvision's RegionProposalNetwork.filter_proposals(box_coder.decode(deltas, anchors), ...)
// for a batch: image_sizes holds (height, width) per image, anchors one [A, 4] tensor shared by every image
// or one per image; with no anchors, the anchor specification (cell_anchors ... strides, as grid_anchors)
// gives them. float32_exp: decode's exponential runs in float32 (the boxes are float32) for float16 /
// bfloat16 deltas, as under CUDA autocast. generate_proposals returns each image's boxes and scores;
// generate_proposals_padded returns [B, post_nms_top_n, 4] boxes, [B, post_nms_top_n] scores (zeros past
// each image's count) and the [B] counts, with no host synchronisation on CUDA.
#define RPN_PROPOSAL_ARGS                                                                                      \
  "Tensor objectness, Tensor pred_bbox_deltas, Tensor[] anchors, int[] image_sizes, "                          \
  "int[] num_anchors_per_level, int pre_nms_top_n, int post_nms_top_n, float nms_thresh, float score_thresh, " \
  "float min_size, Tensor? cell_anchors=None, int[] cells_per_level=[], int[] grid_sizes=[], "                 \
  "int[] strides=[], bool float32_exp=False"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def("generate_proposals(" RPN_PROPOSAL_ARGS ") -> (Tensor[] boxes, Tensor[] scores)");
  m.def("generate_proposals_padded(" RPN_PROPOSAL_ARGS ") -> (Tensor boxes, Tensor scores, Tensor counts)");
}

namespace rpn_ops {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& input, const char* input_name) {
  TORCH_CHECK(t.device() == input.device(), name, " must be on the same device as ", input_name, " (",
              input.device(), "), got ", t.device());
}

}  // namespace

std::tuple<std::vector<int64_t>, std::vector<int64_t>> check_image_sizes(at::IntArrayRef image_sizes) {
  TORCH_CHECK_VALUE(image_sizes.size() % 2 == 0, "image_sizes must hold (height, width) per image, got ",
                    image_sizes.size(), " values");
  std::vector<int64_t> heights, widths;
  for (size_t b = 0; b < image_sizes.size() / 2; ++b) {
    const int64_t height = image_sizes[2 * b], width = image_sizes[2 * b + 1];
    TORCH_CHECK_VALUE(height >= 0 && width >= 0, "image_sizes[", b, "] must be a non-negative (height, width), got (",
                      height, ", ", width, ")");
    heights.push_back(height);
    widths.push_back(width);
  }
  return {heights, widths};
}

std::vector<int64_t> check_levels(at::IntArrayRef num_anchors_per_level) {
  TORCH_CHECK_VALUE(!num_anchors_per_level.empty(), "num_anchors_per_level must hold at least one level");
  std::vector<int64_t> first_anchor;
  int64_t total = 0;
  for (size_t l = 0; l < num_anchors_per_level.size(); ++l) {
    const int64_t count = num_anchors_per_level[l];
    TORCH_CHECK_VALUE(count >= 0, "num_anchors_per_level[", l, "] must be >= 0, got ", count);
    TORCH_CHECK_VALUE(total + count <= kMaxBoxes, "more than ", kMaxBoxes, " anchors per image are not supported");
    first_anchor.push_back(total);
    total += count;
  }
  return first_anchor;
}

std::vector<AnchorLevel> check_anchor_source(at::TensorList anchors, const std::optional<at::Tensor>& cell_anchors,
                                             at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
                                             at::IntArrayRef strides, at::IntArrayRef num_anchors_per_level,
                                             int64_t images, const at::Tensor& input, const char* input_name) {
  int64_t total = 0;
  for (const int64_t count : num_anchors_per_level) total += count;
  std::vector<AnchorLevel> grid;  // with no specification: none
  if (cell_anchors.has_value()) {
    TORCH_CHECK_VALUE(anchors.empty(), "pass either anchors or an anchor specification (cell_anchors), not both");
    check_device(*cell_anchors, "cell_anchors", input, input_name);
    int64_t grid_total = 0;
    grid = check_grid_anchors_inputs(*cell_anchors, cells_per_level, grid_sizes, strides, 1, grid_total);
    TORCH_CHECK_VALUE(grid.size() == num_anchors_per_level.size(), "the anchor specification has ",
                      grid.size(), " levels but num_anchors_per_level has ", num_anchors_per_level.size());
    for (size_t l = 0; l < num_anchors_per_level.size(); ++l) {
      const int64_t level_anchors = grid_sizes[2 * l] * grid_sizes[2 * l + 1] * cells_per_level[l];
      TORCH_CHECK_VALUE(level_anchors == num_anchors_per_level[l], "level ", l, " of the anchor specification has ",
                        level_anchors, " anchors but num_anchors_per_level[", l, "] is ", num_anchors_per_level[l]);
    }
  } else {
    TORCH_CHECK_VALUE(anchors.size() == 1 || static_cast<int64_t>(anchors.size()) == images,
                      "anchors must be one [A, 4] tensor for all images or one per image (", images, "), got ",
                      anchors.size(), " tensors");
    for (size_t b = 0; b < anchors.size(); ++b) {
      const std::string name = "anchors[" + std::to_string(b) + "]";
      TORCH_CHECK(anchors[b].dim() == 2 && anchors[b].size(0) == total && anchors[b].size(1) == 4, name,
                  " must have shape [A, 4] with A = ", total, " (sum of num_anchors_per_level), got ",
                  anchors[b].sizes());
      check_float(anchors[b], name.c_str());
      check_device(anchors[b], name.c_str(), input, input_name);
      TORCH_CHECK_TYPE(anchors[b].scalar_type() == anchors[0].scalar_type(),
                       "all anchors must have one dtype, got ", anchors[0].scalar_type(), " and ",
                       anchors[b].scalar_type());
    }
  }
  return grid;
}

ProposalLayout check_proposal_inputs(const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas,
                                     at::TensorList anchors, at::IntArrayRef image_sizes,
                                     at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
                                     int64_t post_nms_top_n, double nms_thresh, double score_thresh,
                                     double min_size, const std::optional<at::Tensor>& cell_anchors,
                                     at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
                                     at::IntArrayRef strides) {
  ProposalLayout layout;
  std::tie(layout.heights, layout.widths) = check_image_sizes(image_sizes);
  layout.images = static_cast<int64_t>(layout.heights.size());
  const int64_t images = layout.images;
  layout.first_anchor = check_levels(num_anchors_per_level);
  for (size_t l = 0; l < num_anchors_per_level.size(); ++l) {
    const int64_t count = num_anchors_per_level[l];
    layout.anchors.push_back(count);
    layout.first_selected.push_back(layout.total_selected);
    layout.selected.push_back(std::min(count, std::max<int64_t>(pre_nms_top_n, 0)));
    layout.total_anchors += count;
    layout.total_selected += layout.selected.back();
  }
  TORCH_CHECK_VALUE(pre_nms_top_n >= 0, "pre_nms_top_n must be >= 0, got ", pre_nms_top_n);
  TORCH_CHECK_VALUE(post_nms_top_n >= 0, "post_nms_top_n must be >= 0, got ", post_nms_top_n);
  check_threshold(nms_thresh, "nms_thresh");
  check_threshold(score_thresh, "score_thresh");
  check_threshold(min_size, "min_size");
  const int64_t total = layout.total_anchors;

  check_float(objectness, "objectness");
  const bool flat = objectness.dim() == 1 || (objectness.dim() == 2 && objectness.size(1) == 1);
  const bool per_image = objectness.dim() == 2 && objectness.size(0) == images && objectness.size(1) == total;
  TORCH_CHECK(per_image || (flat && objectness.size(0) == images * total),
              "objectness must have shape [B * A, 1], [B * A] or [B, A] with B = ", images,
              " images (image_sizes) and A = ", total, " anchors per image (sum of num_anchors_per_level), got ",
              objectness.sizes());
  check_float(pred_bbox_deltas, "pred_bbox_deltas");
  check_device(pred_bbox_deltas, "pred_bbox_deltas", objectness, "objectness");
  const bool deltas_flat = pred_bbox_deltas.dim() == 2 && pred_bbox_deltas.size(0) == images * total;
  const bool deltas_per_image = pred_bbox_deltas.dim() == 3 && pred_bbox_deltas.size(0) == images &&
                                pred_bbox_deltas.size(1) == total;
  TORCH_CHECK((deltas_flat || deltas_per_image) && pred_bbox_deltas.size(-1) == 4,
              "pred_bbox_deltas must have shape [B * A, 4] or [B, A, 4] with B = ", images, " and A = ", total,
              ", got ", pred_bbox_deltas.sizes());

  layout.anchor_grid = check_anchor_source(anchors, cell_anchors, cells_per_level, grid_sizes, strides,
                                           num_anchors_per_level, images, objectness, "objectness");
  return layout;
}

at::ScalarType proposal_box_type(const at::Tensor& pred_bbox_deltas, bool float32_exp) {
  return coding_output_type(pred_bbox_deltas.scalar_type(), float32_exp);
}

at::Tensor decode_proposals(const at::Tensor& codes, const at::Tensor& boxes, bool float32_exp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("decode_boxes"), "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double, bool)>();
  const double weights[4] = {1.0, 1.0, 1.0, 1.0};  // RegionProposalNetwork's BoxCoder
  return op.call(codes, boxes, weights, std::log(1000.0 / 16), float32_exp);
}

}  // namespace rpn_ops

// Autocast: proposal generation decodes like decode_boxes, so under CUDA autocast its exponential runs in
// float32 (float32 boxes for float16 / bfloat16 deltas); nothing is cast. CPU autocast changes nothing.
namespace rpn_ops {
namespace {

template <typename Result>
Result proposals_autocast_cuda(const char* name, const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas,
                               at::TensorList anchors, at::IntArrayRef image_sizes,
                               at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n, int64_t post_nms_top_n,
                               double nms_thresh, double score_thresh, double min_size,
                               const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level,
                               at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Result(
      const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t,
      double, double, double, const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
      bool)>();
  return op.call(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                 post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors, cells_per_level, grid_sizes, strides,
                 /*float32_exp=*/true);
}

#define RPN_PROPOSAL_AUTOCAST(function, Result, name)                                                             \
  Result function(const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas, at::TensorList anchors,       \
                  at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,     \
                  int64_t post_nms_top_n, double nms_thresh, double score_thresh, double min_size,               \
                  const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level,                \
                  at::IntArrayRef grid_sizes, at::IntArrayRef strides, bool /*float32_exp*/) {                   \
    return proposals_autocast_cuda<Result>(name, objectness, pred_bbox_deltas, anchors, image_sizes,             \
                                           num_anchors_per_level, pre_nms_top_n, post_nms_top_n, nms_thresh,     \
                                           score_thresh, min_size, cell_anchors, cells_per_level, grid_sizes,    \
                                           strides);                                                             \
  }
using ProposalLists = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;
using PaddedProposals = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
RPN_PROPOSAL_AUTOCAST(generate_proposals_autocast_cuda, ProposalLists, RPN_OPS_QUALIFIED("generate_proposals"))
RPN_PROPOSAL_AUTOCAST(generate_proposals_padded_autocast_cuda, PaddedProposals, RPN_OPS_QUALIFIED("generate_proposals_padded"))
#undef RPN_PROPOSAL_AUTOCAST

}  // namespace
}  // namespace rpn_ops

TORCH_LIBRARY_IMPL(RPN_OPS_NAMESPACE, AutocastCUDA, m) {
  m.impl("generate_proposals", TORCH_FN(rpn_ops::generate_proposals_autocast_cuda));
  m.impl("generate_proposals_padded", TORCH_FN(rpn_ops::generate_proposals_padded_autocast_cuda));
}

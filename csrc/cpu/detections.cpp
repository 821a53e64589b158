// dense_detections on the CPU (what it computes: ../detections.h), image by image:
//  1. candidates: sigmoid scores above the threshold by one scan of every level of every image (segment_candidates:
//     it skips the logits that cannot pass and gives torch.sigmoid's bits for each level's tensor, as torchvision
//     computes them); FCOS's scores level by level, from the class scores above the square of the threshold;
//     softmax scores by PyTorch's softmax, then one scan;
//  2. each group's best topk_candidates by a partial sort (nth_element, then a sort of those kept);
//  3. decode of the kept candidates only (the decode_boxes kernel, or decode_linear), clip, then batched NMS that
//     stops at detections_per_img.
// Steps 2 and 3, and softmax's scan, run for the images in parallel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../box_math.h"
#include "../detections.h"
#include "../dispatch.h"
#include "nms.h"
#include "parallel.h"
#include "score_scan.h"

namespace rpn_ops::cpu {
namespace {

// A candidate of an image: `flat` = anchor * classes + class; `position` ranks equal scores within its group.
struct Candidate {
  double score;  // the score's value (exact for every floating dtype)
  int64_t position, flat;
};

bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.position < b.position);
}

// The group's best `limit` candidates, in rank order.
void keep_best(std::vector<Candidate>& group, int64_t limit) {
  if (static_cast<int64_t>(group.size()) > limit) {
    std::nth_element(group.begin(), group.begin() + limit, group.end(), ranks_before);
    group.resize(limit);
  }
  std::sort(group.begin(), group.end(), ranks_before);
}

std::tuple<at::Tensor, at::Tensor> level_candidates(const at::Tensor& logits, double score_thresh) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rpn_ops::score_candidates", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double)>();
  return op.call(logits, score_thresh);
}

// The level's candidates under FCOS's score sqrt(sigmoid(class) * sigmoid(centerness)): (score, flat index within
// the level). sqrt(s * c) > t needs s > t^2 (c <= 1, and rounding only lowers a product of factors <= 1), so
// score_candidates finds the class scores above a bound a little under t^2 (with torchvision's bits); the centerness'
// sigmoid of the whole level gives torchvision's bits there too, and PyTorch's sqrt of the products its own (its
// contiguous sqrt computes every element with one vectorised function).
template <typename S>
std::vector<std::pair<double, int64_t>> centered_candidates(const at::Tensor& logits, const at::Tensor& centerness,
                                                            int64_t classes, double score_thresh) {
  // Below the bound by more than the roundings of S can make up (float16 / bfloat16: 2^-11 / 2^-8 per step).
  const double margin = sizeof(S) == 2 ? 5e-2 : 1e-5;
  const double bound = score_thresh > 0 && score_thresh < 1 ? score_thresh * score_thresh * (1 - margin) : score_thresh;
  const auto [scores, indices] = level_candidates(logits, bound);
  const at::Tensor center_scores = at::sigmoid(centerness);
  const S* s = scores.data_ptr<S>();
  const S* c = center_scores.data_ptr<S>();
  const int64_t* index = indices.data_ptr<int64_t>();
  at::Tensor products = at::empty({indices.numel()}, scores.options());
  for (int64_t j = 0; j < indices.numel(); ++j) {
    products.data_ptr<S>()[j] = centered_product(s[j], c[index[j] / classes]);
  }
  const at::Tensor roots = at::sqrt(products);
  const S* root = roots.data_ptr<S>();
  const opmath_t<S> threshold = static_cast<opmath_t<S>>(to<S>(score_thresh));
  std::vector<std::pair<double, int64_t>> found;
  for (int64_t j = 0; j < indices.numel(); ++j) {
    if (static_cast<opmath_t<S>>(root[j]) > threshold) found.emplace_back(static_cast<double>(root[j]), index[j]);
  }
  return found;
}

// One image's candidates by group (levels or classes), each in position order. `logits`: the image's [A, C]
// class logits; `probabilities`: its softmax, for that activation; `centerness`: its [A] centerness logits, for
// FCOS's scores; `level_scores`: for sigmoid scores, each level's score_candidates (segment_candidates).
std::vector<std::vector<Candidate>> image_candidates(const at::Tensor& logits, const at::Tensor& probabilities,
                                                     const at::Tensor& centerness,
                                                     const std::tuple<at::Tensor, at::Tensor>* level_scores,
                                                     const DetectionLayout& layout, double score_thresh) {
  const int64_t classes = layout.classes, first_class = layout.first_class();
  std::vector<std::vector<Candidate>> groups(layout.groups());
  auto add = [&](int64_t level, double score, int64_t flat) {
    const int64_t anchor = flat / classes;
    if (layout.per_class) {
      groups[flat % classes - first_class].push_back({score, anchor, flat});
    } else {
      groups[level].push_back({score, flat - layout.first_anchor[level] * classes, flat});
    }
  };
  for (int64_t l = 0; l < layout.levels(); ++l) {
    const int64_t first_flat = layout.first_anchor[l] * classes;
    if (layout.centered) {
      visit_float_type(logits.scalar_type(), [&](auto tag) {
        using S = typename decltype(tag)::type;
        const auto found = centered_candidates<S>(logits.narrow(0, layout.first_anchor[l], layout.level_anchors[l]),
                                                  centerness.narrow(0, layout.first_anchor[l], layout.level_anchors[l]),
                                                  classes, score_thresh);
        for (const auto& [score, index] : found) add(l, score, first_flat + index);
      });
      continue;
    }
    if (layout.activation == Activation::kSigmoid) {
      const auto& [scores, indices] = level_scores[l];
      const at::Tensor values = scores.to(at::kDouble);
      for (int64_t j = 0; j < indices.numel(); ++j) {
        add(l, values.data_ptr<double>()[j], first_flat + indices.data_ptr<int64_t>()[j]);
      }
      continue;
    }
    visit_float_type(probabilities.scalar_type(), [&](auto tag) {
      using S = typename decltype(tag)::type;
      using A = opmath_t<S>;
      const S* p = probabilities.data_ptr<S>();
      const A threshold = static_cast<A>(to<S>(score_thresh));  // compared in the scores' dtype, as torch does
      for (int64_t flat = first_flat; flat < first_flat + layout.level_anchors[l] * classes; ++flat) {
        if (flat % classes >= first_class && static_cast<A>(p[flat]) > threshold) {
          add(l, static_cast<double>(static_cast<A>(p[flat])), flat);
        }
      }
    });
  }
  return groups;
}

// The image's kept candidates' anchors [N, 4]: rows of its anchor table, or computed from the specification.
at::Tensor candidate_anchors(at::TensorList anchors, const std::optional<at::Tensor>& cell_anchors, int64_t image,
                             const at::Tensor& anchor_index, const DetectionLayout& layout) {
  if (!cell_anchors.has_value()) return anchors[anchors.size() == 1 ? 0 : image].index_select(0, anchor_index);
  const at::Tensor cells = cell_anchors->contiguous();
  at::Tensor out = at::empty({anchor_index.numel(), 4}, cells.options());
  visit_float_type(cells.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t* index = anchor_index.data_ptr<int64_t>();
    for (int64_t j = 0; j < anchor_index.numel(); ++j) {
      int64_t l = layout.levels() - 1;
      while (index[j] < layout.first_anchor[l]) --l;
      anchor_at(layout.anchor_grid[l], index[j], cells.data_ptr<T>(), out.data_ptr<T>() + 4 * j);
    }
  });
  return out;
}

// [N, 4] codes decoded against [N, 4] boxes of their dtype by BoxLinearCoder's rule (decode_linear).
at::Tensor decode_linear_boxes(const at::Tensor& codes, const at::Tensor& boxes) {
  const at::Tensor c = codes.contiguous(), b = boxes.contiguous();
  at::Tensor out = at::empty_like(c);
  visit_float_type(c.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < c.size(0); ++i) {
      decode_linear(c.data_ptr<T>() + 4 * i, b.data_ptr<T>() + 4 * i, out.data_ptr<T>() + 4 * i);
    }
  });
  return out;
}

// One image's detections from its kept candidates (in group order), written to the first rows of its outputs;
// returns how many.
int64_t image_detections(const std::vector<Candidate>& kept, const at::Tensor& box_regression, at::TensorList anchors,
                         const std::optional<at::Tensor>& cell_anchors, int64_t image, const DetectionLayout& layout,
                         at::ArrayRef<double> weights, double bbox_xform_clip, double nms_thresh,
                         at::ScalarType score_type, const at::Tensor& out_boxes, const at::Tensor& out_scores,
                         const at::Tensor& out_labels) {
  const int64_t count = static_cast<int64_t>(kept.size());
  if (count == 0) return 0;
  const auto long_options = box_regression.options().dtype(at::kLong);
  at::Tensor anchor_index = at::empty({count}, long_options), labels = at::empty({count}, long_options);
  at::Tensor scores = at::empty({count}, box_regression.options().dtype(at::kDouble));
  for (int64_t j = 0; j < count; ++j) {
    anchor_index.data_ptr<int64_t>()[j] = kept[j].flat / layout.classes;
    labels.data_ptr<int64_t>()[j] = kept[j].flat % layout.classes;
    scores.data_ptr<double>()[j] = kept[j].score;
  }
  scores = scores.to(score_type);
  const at::Tensor codes = box_regression.index_select(0, anchor_index);
  const at::Tensor candidate_boxes =
      candidate_anchors(anchors, cell_anchors, image, anchor_index, layout).to(codes.scalar_type());
  at::Tensor boxes = layout.coding == BoxCoding::kLinear
                         ? decode_linear_boxes(codes, candidate_boxes)
                         : decode_detections(codes, candidate_boxes, weights, bbox_xform_clip);
  // torchvision's clip_boxes_to_image: x within [0, width], y within [0, height].
  boxes.select(1, 0).clamp_(0, layout.widths[image]), boxes.select(1, 2).clamp_(0, layout.widths[image]);
  boxes.select(1, 1).clamp_(0, layout.heights[image]), boxes.select(1, 3).clamp_(0, layout.heights[image]);
  const at::Tensor keep = batched_nms(boxes, scores, labels, nms_thresh, layout.detections);
  const int64_t kept_count = keep.numel();
  out_boxes.narrow(0, 0, kept_count).copy_(boxes.index_select(0, keep));
  out_scores.narrow(0, 0, kept_count).copy_(scores.index_select(0, keep));
  out_labels.narrow(0, 0, kept_count).copy_(labels.index_select(0, keep));
  return kept_count;
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
  auto [out_boxes, out_scores, out_labels, counts] = empty_detections(class_logits, box_regression, layout);
  if (layout.detections == 0 || layout.anchors == 0 || layout.classes == 0) {
    return {out_boxes, out_scores, out_labels, counts};
  }
  const at::Tensor logits = class_logits.contiguous();
  // torchvision: F.softmax of each image's [A, C] logits; row by row, so the batch's softmax has the same bits.
  const at::Tensor probabilities =
      layout.activation == Activation::kSoftmax ? at::softmax(logits, -1) : at::Tensor();
  // Sigmoid candidates: one scan of every image's levels shared among the threads (segment_candidates), then each
  // level's scores by its own torch.sigmoid paths; FCOS's level by level. Then the images in parallel: their
  // candidates (for FCOS found before), top-k, decode, NMS.
  const at::Tensor center_logits = layout.centered ? centerness_logits(*centerness) : at::Tensor();
  std::vector<std::tuple<at::Tensor, at::Tensor>> level_scores;
  if (layout.activation == Activation::kSigmoid && !layout.centered) {
    std::vector<int64_t> starts;
    for (int64_t b = 0; b < layout.images; ++b) {
      for (int64_t l = 0; l < layout.levels(); ++l) {
        starts.push_back((b * layout.anchors + layout.first_anchor[l]) * layout.classes);
      }
    }
    level_scores = segment_candidates(logits.view(-1), starts, score_thresh);
  }
  std::vector<std::vector<std::vector<Candidate>>> groups(layout.images);
  auto candidates_of = [&](int64_t b) {
    groups[b] = image_candidates(logits[b], probabilities.defined() ? probabilities[b] : at::Tensor(),
                                 layout.centered ? center_logits[b] : at::Tensor(),
                                 level_scores.empty() ? nullptr : &level_scores[b * layout.levels()], layout,
                                 score_thresh);
  };
  const bool scans_per_image = layout.centered;  // FCOS's scan of each level shares its work among the threads
  if (scans_per_image) {
    for (int64_t b = 0; b < layout.images; ++b) candidates_of(b);
  }
  parallel_for(layout.images, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (!scans_per_image) candidates_of(b);
      std::vector<Candidate> kept;
      for (int64_t g = 0; g < layout.groups(); ++g) {
        keep_best(groups[b][g], layout.group_limit(g));
        kept.insert(kept.end(), groups[b][g].begin(), groups[b][g].end());
      }
      groups[b].clear();
      const at::Tensor image_boxes = out_boxes[b], image_scores = out_scores[b], image_labels = out_labels[b];
      counts.data_ptr<int64_t>()[b] = image_detections(kept, box_regression[b], anchors, cell_anchors, b, layout,
                                                       weights, bbox_xform_clip, nms_thresh, class_logits.scalar_type(),
                                                       image_boxes, image_scores, image_labels);
    }
  });
  return {out_boxes, out_scores, out_labels, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("dense_detections", TORCH_FN(dense_detections));
}

}  // namespace rpn_ops::cpu

// CPU proposal generation: torchvision's RegionProposalNetwork.filter_proposals on decoded anchors, doing
// only the work whose result survives:
//  1. per image and level (threads over both, parallel.h), the top pre_nms_top_n anchors by objectness: a histogram of
//     the sort keys' top bits finds the bucket of the k-th logit in one pass, a second pass collects the
//     anchors above it, and only those at the boundary are partially selected (no full sort);
//  2. sigmoid of the selected logits, laid out as torchvision's [B, K] tensor so PyTorch's kernel gives the
//     same bits; decode of the selected boxes only (the decode_boxes kernel);
//  3. per image and level: clip, the size and score filters, then greedy NMS in score order (nms.h) that
//     stops at post_nms_top_n, since no level contributes more than that;
//  4. per image, the levels' kept boxes merged by descending score, the first post_nms_top_n kept.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "../box_coding.h"
#include "../box_math.h"
#include "../checks.h"
#include "../dispatch.h"
#include "../proposals_checks.h"
#include "nms.h"
#include "parallel.h"

namespace rpn_ops::cpu {
namespace {

// Single-threaded costs, measured on a 2-core Intel Xeon (AVX-512), float32, on the benchmarks' RPN inputs:
// selecting the top anchors of a level, per anchor (3 ns), and everything after it per selected box (decode,
// clip, filters and NMS at IoU 0.7: 250 ns). Computing a selected anchor from the anchor specification is a
// few integer divisions (estimated 5 ns; it stays far below a piece's worth in any real batch).
constexpr double kSelectNanoseconds = 3;
constexpr double kAnchorNanoseconds = 5;
constexpr double kFilterNanoseconds = 250;

// An anchor by its sort key (descending_key: larger logit first, NaN first as torch.topk does) and index:
// comparing (key, index) ranks equal logits by lower index.
template <typename Key>
struct RankedAnchor {
  Key key;
  int64_t index;
  bool operator<(const RankedAnchor& other) const {
    return key < other.key || (key == other.key && index < other.index);
  }
};

// The k largest of count logits, by descending logit (equal logits: lower index first), into top_index.
// A threshold key from a sample of every kSampleStride-th logit lets about 1.5 k keys pass; one pass collects
// them (a rarely taken branch), and only they are partially sorted. Too few passing (a sample unlike the rest,
// many ties): every key passes.
template <typename L>
void select_top(const L* logits, int64_t count, int64_t k, int64_t* top_index) {
  if (k == 0) return;
  auto key_of = [logits](int64_t i) { return descending_key(static_cast<opmath_t<L>>(logits[i])); };
  using Key = decltype(key_of(0));
  constexpr int64_t kSampleStride = 16;
  Key threshold = std::numeric_limits<Key>::max();
  if (count >= 64 * kSampleStride && 4 * k < count) {
    std::vector<Key> sample;
    sample.reserve(count / kSampleStride + 1);
    for (int64_t i = 0; i < count; i += kSampleStride) sample.push_back(key_of(i));
    const int64_t wanted = std::min<int64_t>(static_cast<int64_t>(sample.size()) - 1, (k + k / 2) / kSampleStride + 32);
    std::nth_element(sample.begin(), sample.begin() + wanted, sample.end());
    threshold = sample[wanted];
  }
  std::vector<RankedAnchor<Key>> passed;
  auto collect = [&](Key limit) {
    passed.clear();
    for (int64_t i = 0; i < count; ++i) {
      const Key key = key_of(i);
      if (key <= limit) passed.push_back({key, i});
    }
  };
  collect(threshold);
  if (static_cast<int64_t>(passed.size()) < k) collect(std::numeric_limits<Key>::max());
  std::nth_element(passed.begin(), passed.begin() + (k - 1), passed.end());
  std::sort(passed.begin(), passed.begin() + k);
  for (int64_t r = 0; r < k; ++r) top_index[r] = passed[r].index;
}

// Rows `rows` (count of them) of a contiguous table of row_bytes rows, copied to dst.
void gather_rows(const void* table, int64_t row_bytes, const int64_t* rows, int64_t count, void* dst) {
  const char* from = static_cast<const char*>(table);
  char* to = static_cast<char*>(dst);
  for (int64_t j = 0; j < count; ++j) std::memcpy(to + j * row_bytes, from + rows[j] * row_bytes, row_bytes);
}

// Every image's selected anchors, level by level: their indices (within the image), logits, deltas and, when
// materialised, anchors, each [B * K] rows of the input's dtype.
struct Selection {
  at::Tensor index, logits, codes, anchors;
};

Selection select_anchors(const at::Tensor& logits, const at::Tensor& codes, const std::vector<at::Tensor>& anchors,
                         const ProposalLayout& layout) {
  const int64_t rows = layout.images * layout.total_selected, levels = layout.levels();
  Selection selected{at::empty({rows}, logits.options().dtype(at::kLong)), at::empty({rows}, logits.options()),
                     at::empty({rows, 4}, codes.options()),
                     anchors.empty() ? at::Tensor() : at::empty({rows, 4}, anchors[0].options())};
  visit_float_type(logits.scalar_type(), [&](auto tag) {
    using L = typename decltype(tag)::type;
    const int64_t tasks = layout.images * levels;
    const double cost = static_cast<double>(layout.images * layout.total_anchors) * kSelectNanoseconds;
    parallel_for(tasks, grain_for_tasks(tasks, cost), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / levels, l = task % levels, count = layout.selected[l];
        const int64_t first_row = b * layout.total_selected + layout.first_selected[l];
        const int64_t first_anchor = b * layout.total_anchors + layout.first_anchor[l];
        int64_t* index = selected.index.data_ptr<int64_t>() + first_row;
        select_top(logits.data_ptr<L>() + first_anchor, layout.anchors[l], count, index);
        for (int64_t r = 0; r < count; ++r) index[r] += first_anchor;  // rows of the [B * A] inputs, for now
        gather_rows(logits.data_ptr(), logits.element_size(), index, count,
                    static_cast<char*>(selected.logits.data_ptr()) + first_row * logits.element_size());
        const int64_t code_bytes = 4 * codes.element_size();
        gather_rows(codes.data_ptr(), code_bytes, index, count,
                    static_cast<char*>(selected.codes.data_ptr()) + first_row * code_bytes);
        for (int64_t r = 0; r < count; ++r) index[r] -= b * layout.total_anchors;
        if (!anchors.empty()) {
          const at::Tensor& image_anchors = anchors[anchors.size() == 1 ? 0 : b];
          const int64_t anchor_bytes = 4 * image_anchors.element_size();
          gather_rows(image_anchors.data_ptr(), anchor_bytes, index, count,
                      static_cast<char*>(selected.anchors.data_ptr()) + first_row * anchor_bytes);
        }
      }
    });
  });
  return selected;
}

// The selected anchors computed from the anchor specification, [B * K, 4] of the cell anchors' dtype.
at::Tensor anchors_from_grid(const at::Tensor& cell_anchors, const at::Tensor& index, const ProposalLayout& layout) {
  const at::Tensor cells = cell_anchors.contiguous();
  at::Tensor out = at::empty({index.numel(), 4}, cells.options());
  visit_float_type(cells.scalar_type(), [&](auto tag) {
    using A = typename decltype(tag)::type;
    const int64_t* anchor_index = index.data_ptr<int64_t>();
    A* anchor = out.data_ptr<A>();
    const auto& grid = layout.anchor_grid;
    const int64_t tasks = layout.images * layout.levels();
    const double cost = static_cast<double>(index.numel()) * kAnchorNanoseconds;
    parallel_for(tasks, grain_for_tasks(tasks, cost), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / layout.levels(), l = task % layout.levels();
        const int64_t first = b * layout.total_selected + layout.first_selected[l];
        for (int64_t j = first; j < first + layout.selected[l]; ++j) {
          anchor_at(grid[l], anchor_index[j], cells.data_ptr<A>(), anchor + 4 * j);
        }
      }
    });
  });
  return out;
}

// One image's proposals: the kept boxes of all levels in output order.
struct ImageProposals {
  std::vector<std::vector<int64_t>> kept;  // per level: rows of the [B * K] selection, by descending score
  std::vector<int64_t> order;              // the first post_nms_top_n of all levels' kept rows, merged
};

template <typename S>
using nms_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Clip, filter and NMS of one image's level (rows [first, first + count)): its kept rows by descending score.
template <typename S, typename O>
std::vector<int64_t> level_proposals(S* boxes, const O* scores, int64_t first, int64_t count, int64_t height,
                                     int64_t width, S min_size, O score_thresh, double nms_thresh,
                                     int64_t post_nms_top_n) {
  using A = opmath_t<O>;
  const S x_max = to<S>(static_cast<double>(width)), y_max = to<S>(static_cast<double>(height));
  auto clamp = [](S v, S hi) {  // Tensor.clamp(min=0, max=hi): NaN stays NaN
    v = v < S(0) ? S(0) : v;
    return v > hi ? hi : v;
  };
  std::vector<int64_t> candidates;
  for (int64_t j = first; j < first + count; ++j) {
    S* box = boxes + 4 * j;
    box[0] = clamp(box[0], x_max), box[1] = clamp(box[1], y_max);
    box[2] = clamp(box[2], x_max), box[3] = clamp(box[3], y_max);
    const S w = box[2] - box[0], h = box[3] - box[1];
    if (static_cast<opmath_t<S>>(w) >= static_cast<opmath_t<S>>(min_size) &&
        static_cast<opmath_t<S>>(h) >= static_cast<opmath_t<S>>(min_size) &&
        static_cast<A>(scores[j]) >= static_cast<A>(score_thresh)) {
      candidates.push_back(j);
    }
  }
  // NMS visits by descending score, equal scores in selection order (batched_nms' stable sort); the sigmoid
  // of sorted logits is almost always sorted already.
  auto higher = [scores](int64_t a, int64_t b) { return static_cast<A>(scores[a]) > static_cast<A>(scores[b]); };
  if (!std::is_sorted(candidates.begin(), candidates.end(), higher)) {
    std::stable_sort(candidates.begin(), candidates.end(), higher);
  }
  using C = nms_t<S>;
  const int64_t m = static_cast<int64_t>(candidates.size());
  std::vector<C> nms_boxes(4 * m);
  for (int64_t i = 0; i < m; ++i) {
    for (int c = 0; c < 4; ++c) nms_boxes[4 * i + c] = static_cast<C>(boxes[4 * candidates[i] + c]);
  }
  std::vector<int64_t> visit(m), keep(std::min(m, post_nms_top_n));
  std::iota(visit.begin(), visit.end(), int64_t{0});
  keep.resize(nms_in_order(nms_boxes.data(), m, visit.data(), nms_thresh, post_nms_top_n, keep.data()));
  for (auto& k : keep) k = candidates[k];
  return keep;
}

// The kept rows of every image, merged across levels by descending score (equal scores: lower level
// first, then selection order), at most post_nms_top_n per image.
template <typename S, typename O>
std::vector<ImageProposals> filter_proposals(at::Tensor& boxes, const at::Tensor& scores,
                                             const ProposalLayout& layout, double nms_thresh, double score_thresh,
                                             double min_size, int64_t post_nms_top_n) {
  using A = opmath_t<O>;
  const int64_t levels = layout.levels();
  std::vector<ImageProposals> images(layout.images);
  for (auto& image : images) image.kept.resize(levels);
  S* box_data = boxes.data_ptr<S>();
  const O* score_data = scores.data_ptr<O>();
  const int64_t tasks = layout.images * levels;
  const double cost = static_cast<double>(layout.images * layout.total_selected) * kFilterNanoseconds;
  parallel_for(tasks, grain_for_tasks(tasks, cost), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / levels, l = task % levels;
      images[b].kept[l] = level_proposals<S, O>(
          box_data, score_data, b * layout.total_selected + layout.first_selected[l], layout.selected[l],
          layout.heights[b], layout.widths[b], to<S>(min_size), to<O>(score_thresh), nms_thresh, post_nms_top_n);
    }
  });
  for (auto& image : images) {  // a few microseconds per image: not worth a thread
    std::vector<size_t> next(levels, 0);
    while (static_cast<int64_t>(image.order.size()) < post_nms_top_n) {
      int64_t best = -1;
      for (int64_t l = 0; l < levels; ++l) {
        if (next[l] == image.kept[l].size()) continue;
        if (best < 0 || static_cast<A>(score_data[image.kept[l][next[l]]]) >
                            static_cast<A>(score_data[image.kept[best][next[best]]])) {
          best = l;
        }
      }
      if (best < 0) break;
      image.order.push_back(image.kept[best][next[best]++]);
    }
  }
  return images;
}

// Everything up to the per-image outputs: the [B * K, 4] boxes, [B * K] scores and each image's rows.
std::tuple<at::Tensor, at::Tensor, std::vector<ImageProposals>, ProposalLayout> run_proposals(
    const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas, at::TensorList anchors,
    at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
    int64_t post_nms_top_n, double nms_thresh, double score_thresh, double min_size,
    const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
    at::IntArrayRef strides, bool float32_exp) {
  ProposalLayout layout =
      check_proposal_inputs(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                            post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors, cells_per_level,
                            grid_sizes, strides);
  const int64_t images = layout.images, total = layout.total_anchors;
  std::vector<at::Tensor> anchor_tables;
  for (const auto& image_anchors : anchors) anchor_tables.push_back(image_anchors.contiguous());
  const Selection selected = select_anchors(objectness.reshape({images * total}).contiguous(),
                                            pred_bbox_deltas.reshape({images * total, 4}).contiguous(),
                                            anchor_tables, layout);
  // torchvision: objectness[batch_idx, top_n_idx].sigmoid() on the same [B, K] layout, so the same bits.
  const at::Tensor scores = selected.logits.view({images, -1}).sigmoid().view(-1);
  const at::Tensor selected_anchors =
      cell_anchors.has_value() ? anchors_from_grid(*cell_anchors, selected.index, layout) : selected.anchors;
  // torchvision decodes with boxes.to(rel_codes.dtype).
  at::Tensor boxes = decode_proposals(selected.codes, selected_anchors.to(pred_bbox_deltas.scalar_type()), float32_exp);
  std::vector<ImageProposals> kept;
  visit_float_type(boxes.scalar_type(), [&](auto box_tag) {
    visit_float_type(scores.scalar_type(), [&](auto score_tag) {
      using S = typename decltype(box_tag)::type;
      using O = typename decltype(score_tag)::type;
      kept = filter_proposals<S, O>(boxes, scores, layout, nms_thresh, score_thresh, min_size, post_nms_top_n);
    });
  });
  return {boxes, scores, std::move(kept), std::move(layout)};
}

// An image's output rows among the [B * K] selection.
at::Tensor rows_of(const ImageProposals& image, const at::Tensor& like) {
  at::Tensor rows = at::empty({static_cast<int64_t>(image.order.size())}, like.options().dtype(at::kLong));
  std::copy(image.order.begin(), image.order.end(), rows.data_ptr<int64_t>());
  return rows;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> generate_proposals(
    const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas, at::TensorList anchors,
    at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
    int64_t post_nms_top_n, double nms_thresh, double score_thresh, double min_size,
    const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
    at::IntArrayRef strides, bool float32_exp) {
  auto [boxes, scores, kept, layout] =
      run_proposals(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                    post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors, cells_per_level, grid_sizes,
                    strides, float32_exp);
  std::vector<at::Tensor> image_boxes, image_scores;
  for (int64_t b = 0; b < layout.images; ++b) {
    const at::Tensor rows = rows_of(kept[b], boxes);
    image_boxes.push_back(boxes.index_select(0, rows));
    image_scores.push_back(scores.index_select(0, rows));
  }
  return {image_boxes, image_scores};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_proposals_padded(
    const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas, at::TensorList anchors,
    at::IntArrayRef image_sizes, at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
    int64_t post_nms_top_n, double nms_thresh, double score_thresh, double min_size,
    const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
    at::IntArrayRef strides, bool float32_exp) {
  auto [boxes, scores, kept, layout] =
      run_proposals(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                    post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors, cells_per_level, grid_sizes,
                    strides, float32_exp);
  at::Tensor padded_boxes = at::zeros({layout.images, post_nms_top_n, 4}, boxes.options());
  at::Tensor padded_scores = at::zeros({layout.images, post_nms_top_n}, scores.options());
  at::Tensor counts = at::empty({layout.images}, boxes.options().dtype(at::kLong));
  for (int64_t b = 0; b < layout.images; ++b) {
    const at::Tensor rows = rows_of(kept[b], boxes);
    const int64_t count = rows.numel();
    padded_boxes[b].narrow(0, 0, count).copy_(boxes.index_select(0, rows));
    padded_scores[b].narrow(0, 0, count).copy_(scores.index_select(0, rows));
    counts.data_ptr<int64_t>()[b] = count;
  }
  return {padded_boxes, padded_scores, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("generate_proposals", TORCH_FN(generate_proposals));
  m.impl("generate_proposals_padded", TORCH_FN(generate_proposals_padded));
}

}  // namespace rpn_ops::cpu

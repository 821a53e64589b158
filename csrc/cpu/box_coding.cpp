// CPU anchors and box coding: threads over pieces of rows (parallel.h), vectorised loops. The arithmetic is box_coding.h's, shared
// with CUDA. The exponential and logarithm are PyTorch's own (at::exp_ / at::log_ on chunks of a few thousand
// values held in cache): its vectorised SLEEF/MKL functions are not correctly rounded, so only they give
// torchvision's last bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../box_coding.h"
#include "../checks.h"
#include "../dispatch.h"
#include "coding_chunks.h"
#include "parallel.h"

namespace rpn_ops::cpu {
namespace {

// Single-threaded costs per item, measured on a 2-core Intel Xeon (AVX-512), float32, on the benchmarks' RPN
// inputs: an anchor written for one image (copies for more images cost about as much each), an item decoded,
// an item encoded.
constexpr double kAnchorNanoseconds = 1.25;
constexpr double kDecodeNanoseconds = 4;
constexpr double kEncodeNanoseconds = 3.5;

// ---------------------------------------------------------------------------------------------------------
// Anchors

// Rows [y_begin, y_end) of one level: a piece of the anchors' work.
struct AnchorRows {
  size_t level;
  int64_t y_begin, y_end;
};

// The rows of every level cut into pieces of about the same number of anchors (written num_images times), so
// all levels share one parallel_for.
std::vector<AnchorRows> anchor_pieces(const std::vector<AnchorLevel>& levels, at::IntArrayRef grid_sizes,
                                      int64_t num_images) {
  std::vector<AnchorRows> pieces;
  for (size_t l = 0; l < levels.size(); ++l) {
    const int64_t height = grid_sizes[2 * l], row_anchors = levels[l].grid_width * levels[l].cells;
    if (row_anchors == 0) continue;
    const int64_t rows_per_piece = std::max<int64_t>(1, grain_for(kAnchorNanoseconds) / (row_anchors * num_images));
    for (int64_t y = 0; y < height; y += rows_per_piece) pieces.push_back({l, y, std::min(height, y + rows_per_piece)});
  }
  return pieces;
}

template <typename T>
void fill_grid_anchors(const T* cells, const std::vector<AnchorLevel>& levels, at::IntArrayRef grid_sizes,
                       int64_t num_images, int64_t total, T* out) {
  const std::vector<AnchorRows> pieces = anchor_pieces(levels, grid_sizes, num_images);
  parallel_for(static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const AnchorLevel& level = levels[pieces[p].level];
      const T* level_cells = cells + 4 * level.first_cell;
      const int64_t width = level.grid_width, row_anchors = width * level.cells;
      T* first = out + 4 * (level.first_anchor + pieces[p].y_begin * row_anchors);
      T* anchor = first;
      for (int64_t y = pieces[p].y_begin; y < pieces[p].y_end; ++y) {
        const int64_t shift_y = y * level.stride_y;
        for (int64_t x = 0; x < width; ++x) {
          const int64_t shift_x = x * level.stride_x;
          for (int64_t c = 0; c < level.cells; ++c, anchor += 4) {
            anchor[0] = shifted(shift_x, level_cells[4 * c]);
            anchor[1] = shifted(shift_y, level_cells[4 * c + 1]);
            anchor[2] = shifted(shift_x, level_cells[4 * c + 2]);
            anchor[3] = shifted(shift_y, level_cells[4 * c + 3]);
          }
        }
      }
      for (int64_t image = 1; image < num_images; ++image) {  // copies while the rows are in cache
        std::memcpy(first + 4 * image * total, first, (anchor - first) * sizeof(T));
      }
    }
  });
}

at::Tensor grid_anchors(const at::Tensor& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
                        at::IntArrayRef strides, int64_t num_images) {
  int64_t total = 0;
  const auto levels =
      check_grid_anchors_inputs(cell_anchors, cells_per_level, grid_sizes, strides, num_images, total);
  at::Tensor out = at::empty({num_images, total, 4}, cell_anchors.options());
  if (out.numel() == 0) return out;
  const at::Tensor cells = cell_anchors.contiguous();
  visit_float_type(cells.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    fill_grid_anchors(cells.data_ptr<T>(), levels, grid_sizes, num_images, total, out.data_ptr<T>());
  });
  return out;
}

// Each item's reference box, contiguous: the boxes themselves for one class, else repeated per class.
at::Tensor box_per_item(const at::Tensor& boxes, int64_t classes) {
  if (classes == 1) return boxes.contiguous();
  // contiguous(): for a single box the reshape is a view with a zero stride, not a copy.
  return boxes.unsqueeze(1).expand({boxes.size(0), classes, 4}).reshape({-1, 4}).contiguous();
}

template <typename T, typename S>
void fill_decoded(const at::Tensor& codes, const at::Tensor& boxes, const CpuCodeWeights<T>& weights, T clip,
                  at::Tensor& out) {
  const int64_t items = out.numel() / 4;
  const T* code_data = codes.data_ptr<T>();
  const T* box_data = boxes.data_ptr<T>();
  S* decoded = out.data_ptr<S>();
  const auto run = chunk_for<DecodeChunk<T, S>>(current_isa());
  parallel_for(items, grain_for(kDecodeNanoseconds, kChunkItems), [&](int64_t begin, int64_t end) {
    std::vector<T> columns(4 * kChunkItems);
    std::vector<S> exps(2 * kChunkItems);
    for (int64_t first = begin; first < end; first += kChunkItems) {
      const int64_t count = std::min(end - first, kChunkItems);
      T* column = columns.data();
      run({code_data + 4 * first, box_data + 4 * first, count, weights, clip, column, column + count,
           column + 2 * count, column + 3 * count, exps.data(), decoded + 4 * first});
    }
  });
}

at::Tensor decode_boxes(const at::Tensor& rel_codes, const at::Tensor& boxes, at::ArrayRef<double> weights,
                        double bbox_xform_clip, bool float32_exp) {
  check_decode_inputs(rel_codes, boxes, weights, bbox_xform_clip);
  const auto type = rel_codes.scalar_type();
  at::Tensor out = at::empty(rel_codes.sizes(), rel_codes.options().dtype(coding_output_type(type, float32_exp)));
  if (out.numel() == 0) return out;
  const int64_t classes = rel_codes.size(1) / 4;
  const at::Tensor codes = rel_codes.contiguous();
  const at::Tensor reference = box_per_item(boxes.to(type), classes);  // torchvision: boxes.to(rel_codes.dtype)
  visit_decode_types(type, out.scalar_type(), [&]<typename T, typename S>() {
    fill_decoded<T, S>(codes, reference, CpuCodeWeights<T>(weights.data()), to<T>(bbox_xform_clip), out);
  });
  return out;
}

template <typename R, typename P, typename L>
void fill_encoded(const at::Tensor& reference_boxes, const at::Tensor& proposals, at::ArrayRef<double> weights,
                  at::Tensor& out) {
  using M = promoted_t<R, P>;
  const R* reference = reference_boxes.data_ptr<R>();
  const P* proposal = proposals.data_ptr<P>();
  L* encoded = out.data_ptr<L>();
  const auto run = chunk_for<EncodeChunk<R, P, L>>(current_isa());
  const int64_t grain = grain_for(kEncodeNanoseconds, kChunkItems);
  parallel_for(reference_boxes.size(0), grain, [&](int64_t begin, int64_t end) {
    std::vector<M> columns(2 * kChunkItems);
    std::vector<L> logs(2 * kChunkItems);
    for (int64_t first = begin; first < end; first += kChunkItems) {
      const int64_t count = std::min(end - first, kChunkItems);
      run({reference + 4 * first, proposal + 4 * first, count,
           {to<R>(weights[0]), to<R>(weights[1]), to<R>(weights[2]), to<R>(weights[3])}, columns.data(),
           columns.data() + count, logs.data(), encoded + 4 * first});
    }
  });
}

at::Tensor encode_boxes(const at::Tensor& reference_boxes, const at::Tensor& proposals, at::ArrayRef<double> weights,
                        bool float32_log) {
  check_encode_inputs(reference_boxes, proposals, weights);
  const auto mixed = at::promoteTypes(reference_boxes.scalar_type(), proposals.scalar_type());
  at::Tensor out = at::empty({reference_boxes.size(0), 4},
                             reference_boxes.options().dtype(coding_output_type(mixed, float32_log)));
  if (out.numel() == 0) return out;
  const at::Tensor reference = reference_boxes.contiguous(), proposal = proposals.contiguous();
  const auto encode = [&]<typename R, typename P, typename L>() {
    fill_encoded<R, P, L>(reference, proposal, weights, out);
  };
  visit_encode_types(reference.scalar_type(), proposal.scalar_type(), out.scalar_type(), encode);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("grid_anchors", TORCH_FN(grid_anchors));
  m.impl("decode_boxes", TORCH_FN(decode_boxes));
  m.impl("encode_boxes", TORCH_FN(encode_boxes));
}

}  // namespace rpn_ops::cpu

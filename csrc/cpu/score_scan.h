// score_candidates of several consecutive segments of one flat tensor of logits (cpu/score_candidates.cpp): the
// levels of every image of a batch (cpu/detections.cpp) in one parallel scan instead of one per level and image.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace rpn_ops::cpu {

// Per segment [starts[i], starts[i + 1]) (the last to the end of `flat`), what score_candidates of that segment
// alone gives: its scores above `score_thresh` with torch.sigmoid's bits for that tensor, and their indices within
// the segment.
std::vector<std::tuple<at::Tensor, at::Tensor>> segment_candidates(const at::Tensor& flat,
                                                                   const std::vector<int64_t>& starts,
                                                                   double score_thresh);

}  // namespace rpn_ops::cpu

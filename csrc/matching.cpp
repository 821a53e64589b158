// Schemas of target assignment. Kernels: cpu/matching.cpp, cuda/matching.cu; autocast: autocast.cpp; fake:
// rpn_ops/_meta.py; shared arithmetic: matching.h.
#include "library.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  // Matcher(high_threshold, low_threshold, allow_low_quality_matches)(box_iou(gt, anchors)) for each image of
  // a batch: gt_boxes [sum G_i, 4] and anchors [sum A_i, 4] hold the images one after the other. Returns int64
  // [sum A_i]: each anchor's ground-truth index within its image, -1 below low, -2 between the thresholds.
  // force_best_anchors (SSDMatcher): then each box takes its first anchor of highest IoU (torch.max(dim=1)'s
  // index), whatever the thresholds; of boxes sharing that anchor, the last.
  m.def(
      "match_anchors(Tensor gt_boxes, Tensor anchors, SymInt[] gt_per_image, SymInt[] anchors_per_image, "
      "float high_threshold, float low_threshold, bool allow_low_quality_matches, "
      "bool force_best_anchors=False) -> Tensor");
  // FCOS's centre-sampling assignment (FCOS.compute_loss' matched_idxs, matching.h) for each image of a batch
  // laid out as above, every image's anchors being the levels of anchors_per_level one after the other. Returns
  // int64 [sum A_i]: each anchor's ground-truth index within its image, -1 for none.
  m.def(
      "match_fcos(Tensor gt_boxes, Tensor anchors, SymInt[] gt_per_image, SymInt[] anchors_per_image, "
      "SymInt[] anchors_per_level, float center_sampling_radius) -> Tensor");
  // RegionProposalNetwork.assign_targets_to_anchors and box_coder.encode for a batch laid out as above:
  // labels float32 [sum A_i] (1, 0, -1), matched ground truth [sum A_i, 4] of gt_boxes' dtype (zeros for an
  // image without ground truth), regression targets [sum A_i, 4] encoded with gt_boxes' dtype as the reference
  // boxes' (float32_log: the logarithm in float32 for float16 / bfloat16, as CUDA autocast runs it).
  m.def(
      "assign_targets(Tensor gt_boxes, Tensor anchors, SymInt[] gt_per_image, SymInt[] anchors_per_image, "
      "float high_threshold, float low_threshold, bool allow_low_quality_matches, float[] weights, "
      "bool float32_log=False) -> (Tensor labels, Tensor matched_gt_boxes, Tensor regression_targets)");
}

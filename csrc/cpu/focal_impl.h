// The focal loss of negative targets (t = 0) over a span of float32 logits, included by simd_isa.h once per
// instruction set (simd_kernels.h: FocalKernels): every lane's term at once (focal_math.h). The sums go to
// kFocalSumLanes float64 accumulators by element position, whatever the vector width, so every instruction set
// gives the same sum.

template <typename V>
inline void store(float* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

double focal_negative_sum(const float* x, int64_t count, float alpha, float gamma) {
  constexpr int64_t lanes = kLanes<float>;
  static_assert(kFocalSumLanes % lanes == 0, "a vector's lanes go to consecutive accumulators");
  double sums[kFocalSumLanes] = {};
  int64_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    const Vec<float> loss = focal_loss_of<float, CategoryVec<float>>(load<Vec<float>>(x + i), 0.0f, alpha, gamma);
    const int64_t first = i % kFocalSumLanes;
    for (int64_t k = 0; k < lanes; ++k) sums[first + k] += loss[k];
  }
  for (; i < count; ++i) sums[i % kFocalSumLanes] += focal_loss_of<float, int32_t>(x[i], 0.0f, alpha, gamma);
  double total = 0.0;
  for (double sum : sums) total += sum;
  return total;
}

void focal_negative_gradients(const float* x, int64_t count, float scale, float alpha, float gamma,
                              float* out) {
  constexpr int64_t lanes = kLanes<float>;
  int64_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    store(out + i, focal_gradient_of<float, CategoryVec<float>>(load<Vec<float>>(x + i), 0.0f, alpha, gamma) * scale);
  }
  for (; i < count; ++i) out[i] = focal_gradient_of<float, int32_t>(x[i], 0.0f, alpha, gamma) * scale;
}

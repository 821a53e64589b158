// The scan for score candidates (simd_kernels.h: IndicesAbove), included by simd_isa.h once per instruction
// set. Candidates are rare: a vector of values is compared at once, and only the set lanes of its bit mask
// are visited.

template <typename T>
void indices_above(const T* values, int64_t begin, int64_t end, T lower, std::vector<int64_t>& out) {
  constexpr int64_t lanes = kLanes<T>;
  const Vec<T> bound = broadcast(lower);
  int64_t i = begin;
  for (; i + lanes <= end; i += lanes) {
    for (uint32_t bits = lane_bits(load<Vec<T>>(values + i) > bound, lanes); bits != 0; bits &= bits - 1) {
      out.push_back(i + __builtin_ctz(bits));
    }
  }
  for (; i < end; ++i) {
    if (values[i] > lower) out.push_back(i);
  }
}

template void indices_above<float>(const float*, int64_t, int64_t, float, std::vector<int64_t>&);
template void indices_above<double>(const double*, int64_t, int64_t, double, std::vector<int64_t>&);

// SIMD vectors for the CPU hot loops: GCC vector extensions of the register width kVectorBytes, so the same
// source compiles to SSE, AVX2 or AVX-512. Included once per instruction set by simd_isa.h, after the
// target pragma and inside its namespace; so this and the *_impl.h files include nothing themselves
// (every library header comes before the pragma, keeping library code out of the ISA-specific build).

namespace {

template <typename T>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t categories __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  // As many int32 categories as there are double lanes (the baseline's two lanes use a scalar pair).
  typedef int32_t categories __attribute__((vector_size(kVectorBytes / 2 >= 16 ? kVectorBytes / 2 : 16)));
};
template <typename T>
using Vec = typename VectorOf<T>::type;
template <typename T>
using CategoryVec = typename VectorOf<T>::categories;
template <typename T>
constexpr int64_t kLanes = kVectorBytes / sizeof(T);

template <typename V, typename S>
inline V load(const S* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline Vec<T> broadcast(T value) {
  return Vec<T>{} + value;
}

// Bit k set where lane k of a comparison result is set (only the first `lanes` lanes count).
template <typename Mask>
inline uint32_t lane_bits(const Mask& mask, int64_t lanes) {
#if defined(__x86_64__)
  constexpr size_t bytes = sizeof(Mask), lane = sizeof(mask[0]);
  if constexpr (bytes == 16 && lane == 4) return _mm_movemask_ps(reinterpret_cast<__m128>(mask)) & ((1u << lanes) - 1);
  if constexpr (bytes == 16 && lane == 8) return _mm_movemask_pd(reinterpret_cast<__m128d>(mask));
#if RPN_VECTOR_BYTES >= 32
  if constexpr (bytes == 32 && lane == 4) return _mm256_movemask_ps(reinterpret_cast<__m256>(mask));
  if constexpr (bytes == 32 && lane == 8) return _mm256_movemask_pd(reinterpret_cast<__m256d>(mask));
#endif
#if RPN_VECTOR_BYTES >= 64
  if constexpr (bytes == 64 && lane == 4) return _mm512_movepi32_mask(reinterpret_cast<__m512i>(mask));
  if constexpr (bytes == 64 && lane == 8) return _mm512_movepi64_mask(reinterpret_cast<__m512i>(mask));
#endif
#endif
  uint32_t bits = 0;
  for (int64_t k = 0; k < lanes; ++k) bits |= static_cast<uint32_t>(mask[k] != 0) << k;
  return bits;
}

}  // namespace

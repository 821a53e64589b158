// Stable LSD radix sort of (key, value) pairs, and the float-to-key maps that make it sort scores the way
// torch.sort(descending=True, stable=True) does. Linear time; passes whose digit is the same for every key
// are skipped, so 64-bit keys with small values cost no more than 32-bit ones.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rpn_ops::cpu {

// Sorts keys ascending, moving values along; equal keys keep their input order.
template <typename Key, typename Value>
void radix_sort_pairs(std::vector<Key>& keys, std::vector<Value>& values) {
  constexpr int kDigits = sizeof(Key);
  const size_t n = keys.size();
  std::vector<std::array<size_t, 256>> counts(kDigits);
  for (auto& c : counts) c.fill(0);
  for (size_t i = 0; i < n; ++i) {
    for (int d = 0; d < kDigits; ++d) ++counts[d][(keys[i] >> (8 * d)) & 0xff];
  }
  std::vector<Key> keys_out(n);
  std::vector<Value> values_out(n);
  for (int d = 0; d < kDigits; ++d) {
    auto& count = counts[d];
    if (n == 0 || count[(keys[0] >> (8 * d)) & 0xff] == n) continue;  // every key has this digit
    size_t offset = 0;
    for (auto& c : count) {
      const size_t here = c;
      c = offset;
      offset += here;
    }
    for (size_t i = 0; i < n; ++i) {
      const size_t to = count[(keys[i] >> (8 * d)) & 0xff]++;
      keys_out[to] = keys[i];
      values_out[to] = values[i];
    }
    keys.swap(keys_out);
    values.swap(values_out);
  }
}

// Unsigned keys that sort ascending in the order torch.sort(descending=True) gives the scores:
// NaN first (torch treats it as the largest value), then +inf ... -inf; -0.0 ties with +0.0.
inline uint32_t descending_key(float score) {
  if (std::isnan(score)) return 0;
  if (score == 0.0f) score = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return ~ascending;  // at least 0x007fffff (+inf), so NaN's 0 comes first
}

inline uint64_t descending_key(double score) {
  if (std::isnan(score)) return 0;
  if (score == 0.0) score = 0.0;
  uint64_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  const uint64_t ascending = (bits & 0x8000000000000000ull) ? ~bits : bits | 0x8000000000000000ull;
  return ~ascending;
}

}  // namespace rpn_ops::cpu

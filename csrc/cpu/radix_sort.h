// Stable LSD radix sort of (key, value) pairs. Linear time; passes whose digit is the same for every key are
// skipped, so 64-bit keys with small values cost no more than 32-bit ones.
#pragma once

#include <array>
#include <cstdint>
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

}  // namespace rpn_ops::cpu

// The counter-based dropout hash of moecl_kernels/ops/dropout.py in uint32 arithmetic.
// Host and device: the kernels use it, and the C++ tests check it against values from
// the Python implementation.
//
//   key  = fmix32((seed ^ 0x5BD1E995) + row * 0x9E3779B1)
//   hash = fmix32(key ^ (col * 0x85EBCA77))
//   keep = (hash >> 8) >= threshold24(p)
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOECL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOECL_HOST_DEVICE inline
#endif

namespace moecl {

MOECL_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Per-row part of the hash (computed once per token row).
MOECL_HOST_DEVICE uint32_t dropout_row_key(uint32_t seed, uint32_t row) {
  return fmix32((seed ^ 0x5BD1E995u) + row * 0x9E3779B1u);
}

MOECL_HOST_DEVICE bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t threshold) {
  return (fmix32(row_key ^ (col * 0x85EBCA77u)) >> 8) >= threshold;
}

}  // namespace moecl

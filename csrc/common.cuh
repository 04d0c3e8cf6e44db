// Building blocks shared by the kernels (device side) and their launchers (host side).
//
// Every GEMM-like kernel here computes a 64 x 64 output tile per block of 128 threads
// (2 x 2 warps of 32 x 32) by stepping over K in slices of 32: it stages an A slice
// As[m][k] and a B slice Bs[n][k] (both K-contiguous, zero-filled outside the problem)
// into shared memory, then `tile_mma` accumulates As * Bs^T into per-thread fp32
// registers. bf16/fp16 use tensor cores (mma.sync m16n8k16, fp32 accumulation); fp32
// uses CUDA-core FMAs with the same register ownership, so every epilogue is shared.
// Operands that are fp32 intermediates (not activations or weights) are split into
// hi + lo tensor-core parts, so the kernels round them less than the eager backend does.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <type_traits>

#include "dropout_hash.h"
#include "moecl_kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "moecl kernels need sm_80 or newer (mma.sync m16n8k16 with bf16 operands)"
#endif

namespace moecl {
namespace detail {

constexpr int kThreads = 128;
constexpr int kBM = 64;  // tile rows (tokens for shrink/expand, weight rows for wgrad)
constexpr int kBN = 64;  // tile columns
constexpr int kBK = 32;  // K slice per step
constexpr int kWarpTile = 32;
constexpr int kMI = kWarpTile / 16;  // m16 sub-tiles per warp
constexpr int kNI = kWarpTile / 8;   // n8 sub-tiles per warp
static_assert(kBM == 2 * kWarpTile && kBN == 2 * kWarpTile && kThreads == 128, "2 x 2 warps");
static_assert(kBM == kTile && kBN == kTile && kBN == 2 * kRankChunk, "tile geometry of moecl_kernels.h");

// Shared-memory row length: K slice + padding (conflict-free fragment loads, 16-byte rows).
template <typename T>
constexpr int kSmemLd = kBK + (sizeof(T) == 4 ? 4 : 8);
// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));
template <typename T>
using Tile = T[kBM][kSmemLd<T>];  // kBM == kBN: one type for A and B slices

using Acc = float[kMI][kNI][4];

// 16 bytes of T, for vectorised global loads.
template <typename T>
struct alignas(16) Chunk {
  T v[kVec<T>];
};

// ---------------------------------------------------------------------------------------
// conversions

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// fp32 operands (the rank-r intermediates) enter the tensor cores as hi + lo parts in T
// (a = hi + lo to ~2^-16 relative for bf16), so they carry no more rounding than fp32:
// kParts<T> tiles are staged and multiplied. fp32 tiles need one part.
template <typename T>
constexpr int kParts = std::is_same_v<T, float> ? 1 : 2;

template <typename T>
__device__ __forceinline__ void split_store(Tile<T> (&dst)[kParts<T>], int row, int col, float v) {
  const T hi = from_f32<T>(v);
  dst[0][row][col] = hi;
  if constexpr (kParts<T> == 2) dst[1][row][col] = from_f32<T>(v - to_f32(hi));
}

// ---------------------------------------------------------------------------------------
// block tile product: acc += As[64 x 32] * Bs[64 x 32]^T

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "tensor-core path is for fp16/bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);  // two consecutive 16-bit values, 4-byte aligned
}

// Thread (warp w, lane l) owns acc[mi][ni][j] = C[row][col] with
//   row = (w / 2) * 32 + mi * 16 + l / 4 + 8 * (j / 2),  col = (w % 2) * 32 + ni * 8 + 2 * (l % 4) + j % 2
// (the mma.sync m16n8 accumulator layout; the fp32 path computes the same elements).
template <typename T>
__device__ __forceinline__ void tile_mma(const Tile<T>& As, const Tile<T>& Bs, Acc& acc) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * kWarpTile, wn = (warp % 2) * kWarpTile;
  const int g = lane / 4, t = lane % 4;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float a[kMI][2], b[kNI][2];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        a[mi][0] = As[wm + mi * 16 + g][k];
        a[mi][1] = As[wm + mi * 16 + g + 8][k];
      }
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        b[ni][0] = Bs[wn + ni * 8 + 2 * t][k];
        b[ni][1] = Bs[wn + ni * 8 + 2 * t + 1][k];
      }
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) {
          acc[mi][ni][0] = fmaf(a[mi][0], b[ni][0], acc[mi][ni][0]);
          acc[mi][ni][1] = fmaf(a[mi][0], b[ni][1], acc[mi][ni][1]);
          acc[mi][ni][2] = fmaf(a[mi][1], b[ni][0], acc[mi][ni][2]);
          acc[mi][ni][3] = fmaf(a[mi][1], b[ni][1], acc[mi][ni][3]);
        }
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[kMI][4], b[kNI][2];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        const T* r0 = &As[wm + mi * 16 + g][kk + 2 * t];
        const T* r1 = &As[wm + mi * 16 + g + 8][kk + 2 * t];
        a[mi][0] = load_pair(r0);
        a[mi][1] = load_pair(r1);
        a[mi][2] = load_pair(r0 + 8);
        a[mi][3] = load_pair(r1 + 8);
      }
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const T* q = &Bs[wn + ni * 8 + g][kk + 2 * t];
        b[ni][0] = load_pair(q);
        b[ni][1] = load_pair(q + 8);
      }
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni]);
      }
    }
  }
}

// acc += sum over parts of As[part] * Bs^T.
template <typename T>
__device__ __forceinline__ void tile_mma_parts(const Tile<T> (&As)[kParts<T>], const Tile<T>& Bs, Acc& acc) {
#pragma unroll
  for (int part = 0; part < kParts<T>; ++part) tile_mma(As[part], Bs, acc);
}

// Calls f(row, col, value) for every accumulator element this thread owns.
template <typename F>
__device__ __forceinline__ void for_each_acc(const Acc& acc, F&& f) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * kWarpTile, wn = (warp % 2) * kWarpTile;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        f(wm + mi * 16 + lane / 4 + 8 * (j / 2), wn + ni * 8 + 2 * (lane % 4) + j % 2, acc[mi][ni][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// staging helpers

// dst[n][k] = value(n, k) for the whole 64 x 32 slice. n_fastest: consecutive threads take
// consecutive n (coalesced when the source is contiguous along n), else consecutive k.
template <typename T, typename F>
__device__ __forceinline__ void stage_tile(Tile<T>& dst, bool n_fastest, F&& value) {
  for (int i = threadIdx.x; i < kBN * kBK; i += kThreads) {
    const int n = n_fastest ? i % kBN : i / kBK;
    const int k = n_fastest ? i / kBN : i % kBK;
    dst[n][k] = value(n, k);
  }
}

// Elements [col, col + V) of `row` (zeros at and past `limit`, or for a null row); one
// 16-byte load when vec_ok (row 16-byte aligned at col) and the chunk is in range.
template <typename T>
__device__ __forceinline__ Chunk<T> load_chunk(const T* row, int64_t col, int64_t limit, bool vec_ok) {
  constexpr int V = kVec<T>;
  Chunk<T> c;
  if (row != nullptr && vec_ok && col + V <= limit) {
    *reinterpret_cast<uint4*>(c.v) = __ldg(reinterpret_cast<const uint4*>(row + col));
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) c.v[j] = (row != nullptr && col + j < limit) ? row[col + j] : from_f32<T>(0.0f);
  }
  return c;
}

// The seed (mod 2**32) from device memory; 0 when dropout is off (the pointer may be null).
__device__ __forceinline__ uint32_t dropout_seed(const Dropout& d) {
  return d.enabled ? static_cast<uint32_t>(static_cast<uint64_t>(*d.seed)) : 0u;
}

// x * keep / (1 - p), rounded like ops/dropout.py (product in fp32, one rounding to T).
template <typename T>
__device__ __forceinline__ T dropout_value(T v, const Dropout& d, uint32_t row_key, int64_t col) {
  const bool keep = dropout_keep(row_key, static_cast<uint32_t>(col), d.threshold);
  return from_f32<T>(to_f32(v) * (keep ? 1.0f : 0.0f) * d.keep_scale);
}

// ---------------------------------------------------------------------------------------
// routing

// Positions [begin, end) of the routing order handled by one tile of `rows` positions.
struct TileRange {
  int expert;  // -1: tokens without a task
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Tiles are laid out group after group (experts 0..E-1, then no-task tokens), each group
// split into ceil(n / rows) tiles, so every tile has one expert. Returns false for the
// surplus blocks of the upper-bound grid (see tile_upper_bound).
__device__ __forceinline__ bool find_tile(const Routing& rt, int64_t tile, int rows, TileRange& out) {
  const int64_t T = rt.num_tokens;
  if (rt.offsets == nullptr) {
    out.expert = rt.single_task;
    out.begin = tile * rows;
    out.end = clamp64(out.begin + rows, 0, T);
    return out.begin < T;
  }
  int64_t first = 0;  // first tile of group g
  for (int g = 0; g <= rt.num_experts; ++g) {
    const int64_t gb = clamp64(rt.offsets[g], 0, T);
    const int64_t ge = clamp64(g < rt.num_experts ? rt.offsets[g + 1] : T, gb, T);
    const int64_t n_tiles = (ge - gb + rows - 1) / rows;
    if (tile < first + n_tiles) {
      out.expert = g < rt.num_experts ? g : -1;
      out.begin = gb + (tile - first) * rows;
      out.end = clamp64(out.begin + rows, 0, ge);
      return true;
    }
    first += n_tiles;
  }
  return false;
}

// Positions of expert e's tokens in the routing order (empty when it has none).
__device__ __forceinline__ void expert_range(const Routing& rt, int e, int64_t& begin, int64_t& end) {
  const int64_t T = rt.num_tokens;
  if (rt.offsets == nullptr) {
    begin = 0;
    end = (rt.single_task == e) ? T : 0;
    return;
  }
  begin = clamp64(rt.offsets[e], 0, T);
  end = clamp64(rt.offsets[e + 1], begin, T);
}

// Token at a position of the routing order; -1 if the index is out of range.
__device__ __forceinline__ int64_t token_at(const Routing& rt, int64_t pos) {
  const int64_t tok = rt.sorted_idx != nullptr ? static_cast<int64_t>(rt.sorted_idx[pos]) : pos;
  return (tok >= 0 && tok < rt.num_tokens) ? tok : -1;
}

// ---------------------------------------------------------------------------------------
// host side: argument checks and launch helpers (launch_common.cu)

template <typename... Parts>
Status invalid_argument(const char* op, const Parts&... parts) {
  std::ostringstream os;
  os << "moecl." << op << ": ";
  (os << ... << parts);
  return Status{Code::kInvalidArgument, os.str()};
}

#define MOECL_REQUIRE(cond, ...) \
  do {                           \
    if (!(cond)) return ::moecl::detail::invalid_argument(kOp, __VA_ARGS__); \
  } while (0)

#define MOECL_RETURN_IF_ERROR(expr)  \
  do {                               \
    ::moecl::Status s_ = (expr);     \
    if (!s_.ok()) return s_;         \
  } while (0)

int dtype_size(DType dt);
Status check_dtype(const char* op, DType dt);
Status check_routing(const char* op, const Routing& rt);
Status check_dropout(const char* op, const Dropout& d);
// name is non-null and aligned to `align` bytes.
Status check_pointer(const char* op, const char* name, const void* p, int align);
// A [E] x [n_size] x [k_size] view: non-null, element-aligned, non-negative strides.
Status check_matrix(const char* op, const char* name, const Matrix& m, DType dt);
// Number of tiles of `rows` positions find_tile may return (grid size upper bound).
int64_t tile_upper_bound(const Routing& rt, int rows);
// cudaGetLastError after a launch, as a Status.
Status launch_status(const char* op);

// Calls f(T{}) with T the element type of dt (float, __half or __nv_bfloat16).
template <typename F>
Status with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return Status{Code::kInvalidArgument, "moecl: unknown dtype code"};
}

}  // namespace detail
}  // namespace moecl

// Shrink: one pass over a token tile of the input computes both rank-r projections
// (shared expert and the tile's routed expert) and, in the forward, the two gate logits.
//
// Grid: x = token tiles (grouped by expert, see find_tile), y = rank chunks of 32,
// z = K splits. Block tile: 64 tokens x (32 shared ranks | 32 task ranks). The input
// slice is read once per rank chunk (once for r <= 32), dropout applied while staging.
// Results go to per-split fp32 partials; the finalize kernels sum the splits in a fixed
// order (deterministic) and apply the epilogue math. Many splits = the decode path:
// a few tokens still spread over the whole GPU.
#include "common.cuh"

namespace moecl {
namespace detail {
namespace {

template <typename T>
struct ShrinkParams {
  const T* input;
  int64_t ld_input;
  int64_t K;
  int64_t k_per_split;  // multiple of kBK
  bool input_vec_ok;    // 16-byte loads of input rows allowed
  const T* w_shared;
  int64_t ws_n, ws_k;
  const T* w_task;
  int64_t wt_n, wt_k, wt_e;
  bool w_n_fastest;     // weights contiguous along n (rank): stage with consecutive n per thread
  int r;
  const T* gate;        // [2, K] or null
  Routing route;
  Dropout dropout;
  float* partial;       // [splits][T][2r + 2]
};

template <typename T>
__global__ void __launch_bounds__(kThreads) shrink_kernel(const ShrinkParams<T> p) {
  __shared__ __align__(16) Tile<T> xs;    // dropout(input) slice: 64 tokens x 32 k
  __shared__ __align__(16) Tile<T> xraw;  // raw input slice, for the gate when dropout is on
  __shared__ __align__(16) Tile<T> wsl;   // weights: rows [0, kRankChunk) shared ranks, then task ranks
  __shared__ float gsl[2][kBK];         // gate weight slice
  __shared__ int64_t toks[kBM];

  TileRange tr;
  if (!find_tile(p.route, blockIdx.x, kBM, tr)) return;
  const int tid = threadIdx.x;
  const int rank0 = blockIdx.y * kRankChunk;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = min(p.K, k_begin + p.k_per_split);
  const bool do_gate = p.gate != nullptr && blockIdx.y == 0;
  const bool gate_from_raw = do_gate && p.dropout.enabled;

  if (tid < kBM) toks[tid] = (tr.begin + tid < tr.end) ? token_at(p.route, tr.begin + tid) : -1;
  __syncthreads();

  // Each thread stages the same (row, 16-byte segment) chunks at every K step.
  constexpr int V = kVec<T>;
  constexpr int kSegs = kBK / V;                  // chunks per row
  constexpr int kIters = kBM * kSegs / kThreads;  // chunks per thread
  const T* rows[kIters];
  uint32_t keys[kIters];
  const uint32_t seed = dropout_seed(p.dropout);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t tok = toks[(tid + it * kThreads) / kSegs];
    rows[it] = tok >= 0 ? p.input + tok * p.ld_input : nullptr;
    keys[it] = dropout_row_key(seed, static_cast<uint32_t>(tok));
  }

  Acc acc = {};
  float gacc = 0.0f;  // gate logit (row tid / 2, gate tid % 2)
  const T zero = from_f32<T>(0.0f);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * kThreads;
      const int row = c / kSegs, seg = c % kSegs;
      const int64_t col = k0 + seg * V;
      Chunk<T> ch = load_chunk(rows[it], col, k_end, p.input_vec_ok);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (gate_from_raw) xraw[row][seg * V + j] = ch.v[j];
        xs[row][seg * V + j] = p.dropout.enabled ? dropout_value(ch.v[j], p.dropout, keys[it], col + j) : ch.v[j];
      }
    }
    stage_tile(wsl, p.w_n_fastest, [&](int n, int k) -> T {
      const int64_t kg = k0 + k;
      const int rank = rank0 + n % kRankChunk;
      if (kg >= k_end || rank >= p.r) return zero;
      if (n < kRankChunk) return p.w_shared[rank * p.ws_n + kg * p.ws_k];
      if (tr.expert < 0) return zero;
      return p.w_task[tr.expert * p.wt_e + rank * p.wt_n + kg * p.wt_k];
    });
    if (do_gate && tid < 2 * kBK) {
      const int g = tid / kBK, k = tid % kBK;
      gsl[g][k] = (k0 + k < k_end) ? to_f32(p.gate[g * p.K + k0 + k]) : 0.0f;
    }
    __syncthreads();

    tile_mma(xs, wsl, acc);
    if (do_gate) {
      const Tile<T>& src = gate_from_raw ? xraw : xs;
      const int row = tid / 2, g = tid % 2;
#pragma unroll 8
      for (int k = 0; k < kBK; ++k) gacc = fmaf(to_f32(src[row][k]), gsl[g][k], gacc);
    }
    __syncthreads();
  }

  const int ld = 2 * p.r + 2;
  float* out = p.partial + static_cast<int64_t>(blockIdx.z) * p.route.num_tokens * ld;
  for_each_acc(acc, [&](int row, int col, float v) {
    const int64_t tok = toks[row];
    const int rank = rank0 + col % kRankChunk;
    if (tok < 0 || rank >= p.r) return;
    out[tok * ld + (col < kRankChunk ? 0 : p.r) + rank] = v;
  });
  if (do_gate && toks[tid / 2] >= 0) out[toks[tid / 2] * ld + 2 * p.r + tid % 2] = gacc;
}

struct FinalizeParams {
  const float* partial;
  int splits;
  int64_t T;
  int r;
  const int32_t* token_task;
  // forward
  bool gate;
  float* h_shared;
  float* h_task;
  float* coef_out;
  // backward
  const float* h_shared_in;
  const float* h_task_in;
  const float* coef_in;
  float scale;
  float* dh_shared;
  float* dh_task;
  float* dlogits;
};

// Sum over splits in split order (deterministic).
__device__ __forceinline__ float split_sum(const FinalizeParams& p, int64_t tok, int col) {
  const int64_t ld = 2 * p.r + 2;
  float s = 0.0f;
  for (int i = 0; i < p.splits; ++i) s += p.partial[(i * p.T + tok) * ld + col];
  return s;
}

__global__ void __launch_bounds__(kThreads) shrink_forward_finalize_kernel(const FinalizeParams p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tok >= p.T) return;
  for (int n = 0; n < p.r; ++n) {
    p.h_shared[tok * p.r + n] = split_sum(p, tok, n);
    p.h_task[tok * p.r + n] = split_sum(p, tok, p.r + n);
  }
  const bool has_task = p.token_task[tok] >= 0;
  float c0 = 1.0f, c1 = has_task ? 1.0f : 0.0f;
  if (p.gate && has_task) {
    const float l0 = split_sum(p, tok, 2 * p.r), l1 = split_sum(p, tok, 2 * p.r + 1);
    const float m = fmaxf(l0, l1);
    const float e0 = expf(l0 - m), e1 = expf(l1 - m);
    c0 = e0 / (e0 + e1);
    c1 = e1 / (e0 + e1);
  }
  p.coef_out[2 * tok] = c0;
  p.coef_out[2 * tok + 1] = c1;
}

__global__ void __launch_bounds__(kThreads) shrink_backward_finalize_kernel(const FinalizeParams p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tok >= p.T) return;
  const float c0 = p.coef_in[2 * tok], c1 = p.coef_in[2 * tok + 1];
  float gb0 = 0.0f, gb1 = 0.0f;  // <grad_y B_s, h_s>, <grad_y B_t, h_t>
  for (int n = 0; n < p.r; ++n) {
    const float gs = split_sum(p, tok, n), gt = split_sum(p, tok, p.r + n);
    p.dh_shared[tok * p.r + n] = p.scale * c0 * gs;
    p.dh_task[tok * p.r + n] = p.scale * c1 * gt;
    gb0 = fmaf(gs, p.h_shared_in[tok * p.r + n], gb0);
    gb1 = fmaf(gt, p.h_task_in[tok * p.r + n], gb1);
  }
  if (p.dlogits != nullptr) {
    const bool has_task = p.token_task[tok] >= 0;
    gb0 *= p.scale;
    gb1 *= p.scale;
    const float dot = c0 * gb0 + c1 * gb1;  // softmax backward with beta = coef
    p.dlogits[2 * tok] = has_task ? c0 * (gb0 - dot) : 0.0f;
    p.dlogits[2 * tok + 1] = has_task ? c1 * (gb1 - dot) : 0.0f;
  }
}

Status check_finalize_common(const char* kOp, const float* partial, int splits, int64_t T, int r,
                             const int32_t* token_task) {
  MOECL_REQUIRE(T >= 0 && T <= INT32_MAX, "num_tokens=", T, " is outside [0, 2**31)");
  MOECL_REQUIRE(r >= 1 && r <= kMaxRank, "r=", r, " is outside [1, ", kMaxRank, "]");
  MOECL_REQUIRE(splits >= 1 && splits <= kMaxSplits, "splits=", splits, " is outside [1, ", kMaxSplits, "]");
  if (T == 0) return {};
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "partial", partial, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "token_task", token_task, 4));
  return {};
}

unsigned finalize_blocks(int64_t T) { return static_cast<unsigned>((T + kThreads - 1) / kThreads); }

}  // namespace
}  // namespace detail

Status shrink(const ShrinkArgs& a) {
  using namespace detail;
  constexpr const char* kOp = "shrink";
  MOECL_RETURN_IF_ERROR(check_dtype(kOp, a.dtype));
  MOECL_RETURN_IF_ERROR(check_routing(kOp, a.route));
  MOECL_RETURN_IF_ERROR(check_dropout(kOp, a.dropout));
  MOECL_REQUIRE(a.K >= 1, "K=", a.K, " must be >= 1");
  MOECL_REQUIRE(a.r >= 1 && a.r <= kMaxRank, "r=", a.r, " is outside [1, ", kMaxRank, "] supported by the cuda backend");
  MOECL_REQUIRE(a.splits >= 1 && a.splits <= kMaxSplits, "splits=", a.splits, " is outside [1, ", kMaxSplits, "]");
  const int64_t T = a.route.num_tokens;
  const int64_t need = static_cast<int64_t>(a.splits) * T * (2 * a.r + 2);
  MOECL_REQUIRE(a.partial_elems >= need, "partial has ", a.partial_elems, " elements, needs splits*T*(2r+2) = ", need);
  if (T == 0) return {};
  const int esize = dtype_size(a.dtype);
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "input", a.input, esize));
  MOECL_REQUIRE(a.ld_input >= a.K, "ld_input=", a.ld_input, " is smaller than K=", a.K);
  MOECL_RETURN_IF_ERROR(check_matrix(kOp, "shared", a.shared, a.dtype));
  MOECL_RETURN_IF_ERROR(check_matrix(kOp, "task", a.task, a.dtype));
  if (a.gate != nullptr) MOECL_RETURN_IF_ERROR(check_pointer(kOp, "gate", a.gate, esize));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "partial", a.partial, 4));

  const int64_t per_split = (a.K + a.splits - 1) / a.splits;
  const int64_t k_per_split = (per_split + kBK - 1) / kBK * kBK;
  // All `splits` slices are launched (a slice past K writes zeros): the finalize sums all of them.
  const dim3 grid(static_cast<unsigned>(tile_upper_bound(a.route, kBM)), (a.r + kRankChunk - 1) / kRankChunk,
                  static_cast<unsigned>(a.splits));
  const int vec_bytes = 16;
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    ShrinkParams<T> p;
    p.input = static_cast<const T*>(a.input);
    p.ld_input = a.ld_input;
    p.K = a.K;
    p.k_per_split = k_per_split;
    p.input_vec_ok = reinterpret_cast<uintptr_t>(a.input) % vec_bytes == 0 && a.ld_input % kVec<T> == 0;
    p.w_shared = static_cast<const T*>(a.shared.data);
    p.ws_n = a.shared.stride_n;
    p.ws_k = a.shared.stride_k;
    p.w_task = static_cast<const T*>(a.task.data);
    p.wt_n = a.task.stride_n;
    p.wt_k = a.task.stride_k;
    p.wt_e = a.task.stride_e;
    p.w_n_fastest = a.shared.stride_n == 1;
    p.r = a.r;
    p.gate = static_cast<const T*>(a.gate);
    p.route = a.route;
    p.dropout = a.dropout;
    p.partial = a.partial;
    shrink_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
    return launch_status(kOp);
  });
}

Status shrink_forward_finalize(const ShrinkForwardFinalizeArgs& a) {
  using namespace detail;
  constexpr const char* kOp = "shrink_forward_finalize";
  MOECL_RETURN_IF_ERROR(check_finalize_common(kOp, a.partial, a.splits, a.num_tokens, a.r, a.token_task));
  if (a.num_tokens == 0) return {};
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "h_shared", a.h_shared, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "h_task", a.h_task, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "coef", a.coef, 4));
  FinalizeParams p{};
  p.partial = a.partial;
  p.splits = a.splits;
  p.T = a.num_tokens;
  p.r = a.r;
  p.token_task = a.token_task;
  p.gate = a.gate;
  p.h_shared = a.h_shared;
  p.h_task = a.h_task;
  p.coef_out = a.coef;
  shrink_forward_finalize_kernel<<<finalize_blocks(a.num_tokens), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
  return launch_status(kOp);
}

Status shrink_backward_finalize(const ShrinkBackwardFinalizeArgs& a) {
  using namespace detail;
  constexpr const char* kOp = "shrink_backward_finalize";
  MOECL_RETURN_IF_ERROR(check_finalize_common(kOp, a.partial, a.splits, a.num_tokens, a.r, a.token_task));
  if (a.num_tokens == 0) return {};
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "h_shared", a.h_shared, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "h_task", a.h_task, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "coef", a.coef, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "dh_shared", a.dh_shared, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "dh_task", a.dh_task, 4));
  if (a.dlogits != nullptr) MOECL_RETURN_IF_ERROR(check_pointer(kOp, "dlogits", a.dlogits, 4));
  FinalizeParams p{};
  p.partial = a.partial;
  p.splits = a.splits;
  p.T = a.num_tokens;
  p.r = a.r;
  p.token_task = a.token_task;
  p.h_shared_in = a.h_shared;
  p.h_task_in = a.h_task;
  p.coef_in = a.coef;
  p.scale = a.scale;
  p.dh_shared = a.dh_shared;
  p.dh_task = a.dh_task;
  p.dlogits = a.dlogits;
  shrink_backward_finalize_kernel<<<finalize_blocks(a.num_tokens), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
  return launch_status(kOp);
}

}  // namespace moecl

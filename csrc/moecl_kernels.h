// Launcher API of the moecl CUDA kernels: plain C++ (no torch, no CUDA headers).
//
// Each launcher checks its arguments, enqueues its kernel(s) on `stream` (a cudaStream_t
// passed as void*) and returns a Status: ok, an invalid argument (the message names it)
// or a CUDA launch error. Data are raw device pointers; matrices are addressed through
// explicit element strides, so any strided weight view works without a copy. Token
// matrices (x, grad_y, y, dx) need unit stride along features and a row stride `ld`.
//
// Notation (SPEC section 1 and moecl_kernels/backends/base.py): T tokens, r rank,
// E experts, s scale, coef [T, 2] = effective (shared, task) gate coefficients,
// h_s / h_t [T, r] = unscaled rank-r intermediates, all fp32 and contiguous.
#pragma once

#include <cstdint>
#include <string>

namespace moecl {

constexpr int kMaxRank = 128;    // r in [1, kMaxRank]
constexpr int kMaxExperts = 64;  // E in [1, kMaxExperts] (trainable-expert masks are 64-bit)
constexpr int kMaxSplits = 1024; // split-K / split-token factor
constexpr int kTile = 64;        // block output tile edge: tokens (shrink, expand), weight rows / columns (wgrad)
constexpr int kRankChunk = 32;   // ranks per shrink block (grid y = ceil(r / kRankChunk))

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Code : int { kOk = 0, kInvalidArgument = 1, kCudaError = 2 };

struct Status {
  Code code = Code::kOk;
  std::string message;  // "moecl.<launcher>: ..." when not ok
  bool ok() const { return code == Code::kOk; }
};

// Token -> expert routing (built by moecl_kernels/routing.py).
struct Routing {
  const int32_t* sorted_idx = nullptr;  // [T] tokens grouped by expert 0..E-1, then no-task tokens
  const int32_t* offsets = nullptr;     // [E+1]; null: one group of all tokens with expert single_task
  int32_t single_task = -1;             // used when offsets is null: every token's expert (-1 = none)
  int64_t num_tokens = 0;               // T
  int32_t num_experts = 0;              // E
};

// Seeded hash dropout of moecl_kernels/ops/dropout.py (see dropout_hash.h). The seed is read
// from device memory by the kernels (never passed by value), so a captured CUDA graph replays
// with whatever the seed tensor holds at replay time.
struct Dropout {
  bool enabled = false;
  const int64_t* seed = nullptr;  // device pointer to the seed (used mod 2**32); required when enabled
  uint32_t threshold = 0;   // threshold24(p): keep iff (hash >> 8) >= threshold
  float keep_scale = 1.0f;  // 1 / (1 - p)
};

// A stack of matrices W_e(n, k) = data[e * stride_e + n * stride_n + k * stride_k] (elements).
struct Matrix {
  const void* data = nullptr;
  int64_t stride_n = 0;
  int64_t stride_k = 0;
  int64_t stride_e = 0;
};

// partial[split][t][c] (fp32, row length 2r + 2) for c < r:  sum_k in~[t, k] * shared(c, k)
//                                              r <= c < 2r:  sum_k in~[t, k] * task_{e(t)}(c - r, k)
//                                                    2r + g: sum_k in[t, k] * gate[g, k]   (gate only)
// with in~ = dropout(in), k over the split's slice of [0, K). Tokens without a task get 0 in
// the task columns. Forward: in = x, weights A (n = rank). Backward: in = grad_y, weights B.
struct ShrinkArgs {
  DType dtype = DType::kFloat32;
  const void* input = nullptr;  // [T, K] with row stride ld_input
  int64_t ld_input = 0;
  int64_t K = 0;
  Matrix shared;                // n < r, k < K
  Matrix task;                  // experts e < E
  int r = 0;
  const void* gate = nullptr;   // [2, K] contiguous, or null
  Routing route;
  Dropout dropout;
  float* partial = nullptr;
  int64_t partial_elems = 0;    // capacity check: needs splits * T * (2r + 2)
  int splits = 1;               // split-K factor (decode: many splits, big T: 1)
  void* stream = nullptr;
};
Status shrink(const ShrinkArgs& a);

// Forward epilogue of shrink: h_s, h_t [T, r] = sums over splits; coef [T, 2] from the
// gate logits (softmax) or [1, 1]; tokens without a task get coef [1, 0].
struct ShrinkForwardFinalizeArgs {
  const float* partial = nullptr;
  int splits = 1;
  int64_t num_tokens = 0;
  int r = 0;
  const int32_t* token_task = nullptr;  // [T]
  bool gate = false;
  float* h_shared = nullptr;
  float* h_task = nullptr;
  float* coef = nullptr;
  void* stream = nullptr;
};
Status shrink_forward_finalize(const ShrinkForwardFinalizeArgs& a);

// Backward epilogue of shrink (partial holds grad_y B_s and grad_y B_t):
//   dh_s = s coef_s (grad_y B_s),  dh_t = s coef_t (grad_y B_t)
//   dlogits = beta * (gbeta - <beta, gbeta>), gbeta = s (<grad_y B_s, h_s>, <grad_y B_t, h_t>),
//   zero for tokens without a task; dlogits null = gate off.
struct ShrinkBackwardFinalizeArgs {
  const float* partial = nullptr;
  int splits = 1;
  int64_t num_tokens = 0;
  int r = 0;
  const int32_t* token_task = nullptr;
  const float* h_shared = nullptr;
  const float* h_task = nullptr;
  const float* coef = nullptr;
  float scale = 1.0f;
  float* dh_shared = nullptr;
  float* dh_task = nullptr;
  float* dlogits = nullptr;  // [T, 2] or null
  void* stream = nullptr;
};
Status shrink_backward_finalize(const ShrinkBackwardFinalizeArgs& a);

// In-place gated expand: out[t, n] += mask(t, n) * sum_k (g_s[t, k] shared(n, k) + g_t[t, k] task_{e(t)}(n, k))
//                                   + dlogits[t, 0] gate[0, n] + dlogits[t, 1] gate[1, n]
// with g_x = scale * coef[t, x] * h_x (coef null: scale * h_x) and mask the dropout keep/scale
// (identity when dropout is disabled). Forward: out = y, h = h_s/h_t, weights B (n = d_out).
// Backward: out = dx, h = dh_s/dh_t, weights A (n = d_in), dropout and gate term on.
struct ExpandArgs {
  DType dtype = DType::kFloat32;
  void* out = nullptr;          // [T, N] with row stride ld_out
  int64_t ld_out = 0;
  int64_t N = 0;
  const float* h_shared = nullptr;  // [T, r] contiguous
  const float* h_task = nullptr;
  int r = 0;
  const float* coef = nullptr;  // [T, 2] or null
  float scale = 1.0f;
  Matrix shared;                // n < N, k < r
  Matrix task;
  Routing route;
  Dropout dropout;
  const float* dlogits = nullptr;  // [T, 2] or null
  const void* gate = nullptr;      // [2, N] contiguous; required with dlogits
  void* stream = nullptr;
};
Status expand(const ExpandArgs& a);

// Weight gradient, a ragged reduction over tokens:
//   out_e[m, c] = sum_{t in group(e)} scale * coef[t, coef_col] * p[t, m] * dropout(q)[t, c]
// per_expert = false: one output over all tokens (shared expert, gate).
// per_expert = true: E outputs (stride out_stride_e), group(e) = tokens routed to expert e;
//   experts whose bit is clear in `trainable` get zeros and cost no compute.
// Deterministic: splits > 1 writes per-split partials to `workspace` and reduces them in a
// fixed order (no atomics); workspace needs n_trainable_jobs * splits * m * C floats.
struct WgradArgs {
  DType dtype = DType::kFloat32;
  const float* p = nullptr;     // [T, ld_p] fp32; column m < rows is used
  int64_t ld_p = 0;
  int rows = 0;                 // M: r (LoRA) or 2 (gate)
  const float* coef = nullptr;  // [T, 2] or null (1)
  int coef_col = 0;
  float scale = 1.0f;
  const void* q = nullptr;      // [T, C] with row stride ld_q
  int64_t ld_q = 0;
  int64_t C = 0;
  Dropout dropout;              // applied to q
  Routing route;
  bool per_expert = false;
  uint64_t trainable = 0;       // per_expert: bit e set = compute expert e
  void* out = nullptr;          // out_e[m, c] at out + e * out_stride_e + m * out_stride_m + c * out_stride_c
  int64_t out_stride_m = 0;
  int64_t out_stride_c = 0;
  int64_t out_stride_e = 0;
  float* workspace = nullptr;   // required when splits > 1
  int64_t workspace_elems = 0;
  int splits = 1;               // split over each group's tokens
  void* stream = nullptr;
};
Status wgrad(const WgradArgs& a);

// "major.minor" of the CUDA toolkit the kernels were compiled with.
std::string cuda_version();

}  // namespace moecl

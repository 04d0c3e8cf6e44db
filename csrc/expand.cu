// Gated expand, accumulated in place into a token matrix (y in the forward, dx in the backward).
//
// Grid: x = token tiles (grouped by expert, see find_tile), y = column tiles of 64.
// K = the shared expert's r ranks then the tile's routed expert's r ranks, in slices
// of 32: the A slice is the scaled rank-r input g = scale * coef * h (fp32, staged as
// hi + lo parts, see kParts), the B slice the expert weights. The
// epilogue applies the dropout mask (backward), adds the gate term (backward) and adds
// into `out` with one rounding. Each output element belongs to exactly one block.
#include "common.cuh"

namespace moecl {
namespace detail {
namespace {

template <typename T>
struct ExpandParams {
  T* out;
  int64_t ld_out;
  int64_t N;
  const float* h_shared;
  const float* h_task;
  int r;
  const float* coef;
  float scale;
  const T* w_shared;
  int64_t ws_n, ws_k;
  const T* w_task;
  int64_t wt_n, wt_k, wt_e;
  bool w_n_fastest;
  Routing route;
  Dropout dropout;
  const float* dlogits;
  const T* gate;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandParams<T> p) {
  __shared__ __align__(16) Tile<T> gsl[kParts<T>];  // scaled inputs g: 64 tokens x 32 ranks
  __shared__ __align__(16) Tile<T> wsl;  // weights: 64 columns x 32 ranks
  __shared__ int64_t toks[kBM];

  TileRange tr;
  if (!find_tile(p.route, blockIdx.x, kBM, tr)) return;
  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  if (tid < kBM) toks[tid] = (tr.begin + tid < tr.end) ? token_at(p.route, tr.begin + tid) : -1;
  __syncthreads();

  const T zero = from_f32<T>(0.0f);
  const int r_steps = (p.r + kBK - 1) / kBK;
  const int steps = (tr.expert >= 0 ? 2 : 1) * r_steps;  // tokens without a task: shared expert only
  Acc acc = {};
  for (int step = 0; step < steps; ++step) {
    const int src = step / r_steps;  // 0 shared, 1 task
    const int kr0 = (step % r_steps) * kBK;
    const float* h = src == 0 ? p.h_shared : p.h_task;
    for (int i = tid; i < kBM * kBK; i += kThreads) {
      const int m = i / kBK, k = i % kBK;
      const int64_t tok = toks[m];
      const int rank = kr0 + k;
      float v = 0.0f;
      if (tok >= 0 && rank < p.r) {
        const float c = p.coef != nullptr ? p.coef[2 * tok + src] : 1.0f;
        v = p.scale * c * h[tok * p.r + rank];
      }
      split_store(gsl, m, k, v);
    }
    stage_tile(wsl, p.w_n_fastest, [&](int n, int k) -> T {
      const int64_t col = n0 + n;
      const int rank = kr0 + k;
      if (col >= p.N || rank >= p.r) return zero;
      return src == 0 ? p.w_shared[col * p.ws_n + rank * p.ws_k]
                      : p.w_task[tr.expert * p.wt_e + col * p.wt_n + rank * p.wt_k];
    });
    __syncthreads();
    tile_mma_parts(gsl, wsl, acc);
    __syncthreads();
  }

  const uint32_t seed = dropout_seed(p.dropout);
  for_each_acc(acc, [&](int row, int c, float v) {
    const int64_t tok = toks[row];
    const int64_t col = n0 + c;
    if (tok < 0 || col >= p.N) return;
    if (p.dropout.enabled) {
      const bool keep = dropout_keep(dropout_row_key(seed, static_cast<uint32_t>(tok)),
                                     static_cast<uint32_t>(col), p.dropout.threshold);
      v *= keep ? p.dropout.keep_scale : 0.0f;
    }
    if (p.dlogits != nullptr) {
      v = fmaf(p.dlogits[2 * tok], to_f32(p.gate[col]), v);
      v = fmaf(p.dlogits[2 * tok + 1], to_f32(p.gate[p.N + col]), v);
    }
    T* o = p.out + tok * p.ld_out + col;
    *o = from_f32<T>(to_f32(*o) + v);
  });
}

}  // namespace
}  // namespace detail

Status expand(const ExpandArgs& a) {
  using namespace detail;
  constexpr const char* kOp = "expand";
  MOECL_RETURN_IF_ERROR(check_dtype(kOp, a.dtype));
  MOECL_RETURN_IF_ERROR(check_routing(kOp, a.route));
  MOECL_RETURN_IF_ERROR(check_dropout(kOp, a.dropout));
  MOECL_REQUIRE(a.N >= 1, "N=", a.N, " must be >= 1");
  MOECL_REQUIRE((a.N + kBN - 1) / kBN <= 65535, "N=", a.N, " exceeds the column-tile grid limit (65535 * ", kBN, ")");
  MOECL_REQUIRE(a.r >= 1 && a.r <= kMaxRank, "r=", a.r, " is outside [1, ", kMaxRank, "] supported by the cuda backend");
  if (a.route.num_tokens == 0) return {};
  const int esize = dtype_size(a.dtype);
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "out", a.out, esize));
  MOECL_REQUIRE(a.ld_out >= a.N, "ld_out=", a.ld_out, " is smaller than N=", a.N);
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "h_shared", a.h_shared, 4));
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "h_task", a.h_task, 4));
  if (a.coef != nullptr) MOECL_RETURN_IF_ERROR(check_pointer(kOp, "coef", a.coef, 4));
  MOECL_RETURN_IF_ERROR(check_matrix(kOp, "shared", a.shared, a.dtype));
  MOECL_RETURN_IF_ERROR(check_matrix(kOp, "task", a.task, a.dtype));
  if (a.dlogits != nullptr) {
    MOECL_RETURN_IF_ERROR(check_pointer(kOp, "dlogits", a.dlogits, 4));
    MOECL_RETURN_IF_ERROR(check_pointer(kOp, "gate", a.gate, esize));
  }

  const dim3 grid(static_cast<unsigned>(tile_upper_bound(a.route, kBM)), static_cast<unsigned>((a.N + kBN - 1) / kBN));
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    ExpandParams<T> p;
    p.out = static_cast<T*>(a.out);
    p.ld_out = a.ld_out;
    p.N = a.N;
    p.h_shared = a.h_shared;
    p.h_task = a.h_task;
    p.r = a.r;
    p.coef = a.coef;
    p.scale = a.scale;
    p.w_shared = static_cast<const T*>(a.shared.data);
    p.ws_n = a.shared.stride_n;
    p.ws_k = a.shared.stride_k;
    p.w_task = static_cast<const T*>(a.task.data);
    p.wt_n = a.task.stride_n;
    p.wt_k = a.task.stride_k;
    p.wt_e = a.task.stride_e;
    p.w_n_fastest = a.shared.stride_n == 1;
    p.route = a.route;
    p.dropout = a.dropout;
    p.dlogits = a.dlogits;
    p.gate = static_cast<const T*>(a.gate);
    expand_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
    return launch_status(kOp);
  });
}

}  // namespace moecl

// Weight gradients as ragged reductions over tokens:
//   out_e[m, c] = sum_{t in group(e)} scale * coef[t, coef_col] * p[t, m] * dropout(q)[t, c]
// dB = grad_y^T (s coef h)  (p = h, q = grad_y), dA = dh^T x~  (p = dh, q = x with dropout),
// dgate = dlogits^T x  (p = dlogits, q = x).
//
// Grid: x = (column tiles of 64) x (row tiles of 64), y = token splits, z = jobs (one, or
// one per expert). Each block reduces its split's tokens in slices of 32 with the tile
// product (tokens are the K dimension; the fp32 p enters as hi + lo parts, see kParts). splits == 1 writes the output directly; otherwise
// every block writes an fp32 partial and wgrad_reduce_kernel sums the splits in order.
// No atomics anywhere: results are bitwise reproducible.
#include <algorithm>

#include "common.cuh"

namespace moecl {
namespace detail {
namespace {

template <typename T>
struct WgradParams {
  const float* p;
  int64_t ld_p;
  int rows;  // M
  const float* coef;
  int coef_col;
  float scale;
  const T* q;
  int64_t ld_q;
  int64_t C;
  bool q_vec_ok;
  Dropout dropout;
  Routing route;
  bool per_expert;
  uint64_t trainable;
  T* out;
  int64_t out_sm, out_sc, out_se;
  float* workspace;  // [n_trainable_jobs][splits][M][C]
  int splits;
  int c_tiles;
};

template <typename T>
__device__ __forceinline__ bool job_trainable(const WgradParams<T>& p, int job) {
  return !p.per_expert || ((p.trainable >> job) & 1u);
}

// Index of a trainable job among the trainable jobs (its workspace slot).
template <typename T>
__device__ __forceinline__ int64_t job_slot(const WgradParams<T>& p, int job) {
  return p.per_expert ? __popcll(p.trainable & ((1ull << job) - 1ull)) : 0;
}

template <typename T>
__device__ __forceinline__ T* out_ptr(const WgradParams<T>& p, int job, int64_t m, int64_t c) {
  return p.out + job * p.out_se + m * p.out_sm + c * p.out_sc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradParams<T> p) {
  __shared__ __align__(16) Tile<T> psl[kParts<T>];  // (scaled p)^T slice: 64 rows (m) x 32 tokens
  __shared__ __align__(16) Tile<T> qsl;  // q^T slice: 64 columns (c) x 32 tokens
  __shared__ int64_t toks[kBK];

  const int tid = threadIdx.x;
  const int job = blockIdx.z, split = blockIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % p.c_tiles) * kBN;
  const int m0 = static_cast<int>(blockIdx.x / p.c_tiles) * kBM;

  if (!job_trainable(p, job)) {  // frozen expert: zeros, no compute
    if (p.splits == 1) {
      for (int i = tid; i < kBM * kBN; i += kThreads) {
        const int m = m0 + i / kBN;
        const int64_t c = c0 + i % kBN;
        if (m < p.rows && c < p.C) *out_ptr(p, job, m, c) = from_f32<T>(0.0f);
      }
    }
    return;
  }

  int64_t begin = 0, end = p.route.num_tokens;
  bool sorted = false;
  if (p.per_expert) {
    expert_range(p.route, job, begin, end);
    sorted = p.route.offsets != nullptr;
  }
  const int64_t per_split = ((end - begin + p.splits - 1) / p.splits + kBK - 1) / kBK * kBK;
  const int64_t s_begin = min(end, begin + split * per_split);
  const int64_t s_end = min(end, s_begin + per_split);

  constexpr int V = kVec<T>;
  constexpr int kSegs = kBN / V;                  // chunks per token row of the q slice
  constexpr int kIters = kBK * kSegs / kThreads;  // chunks per thread
  Acc acc = {};
  const uint32_t seed = dropout_seed(p.dropout);
  for (int64_t pos0 = s_begin; pos0 < s_end; pos0 += kBK) {
    if (tid < kBK) {
      const int64_t pos = pos0 + tid;
      toks[tid] = pos < s_end ? (sorted ? token_at(p.route, pos) : pos) : -1;
    }
    __syncthreads();
    for (int i = tid; i < kBM * kBK; i += kThreads) {
      const int m = i % kBM, k = i / kBM;
      const int64_t tok = toks[k];
      float v = 0.0f;
      if (tok >= 0 && m0 + m < p.rows) {
        const float c = p.coef != nullptr ? p.coef[2 * tok + p.coef_col] : 1.0f;
        v = p.scale * c * p.p[tok * p.ld_p + m0 + m];
      }
      split_store(psl, m, k, v);
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int ch = tid + it * kThreads;
      const int k = ch / kSegs, seg = ch % kSegs;
      const int64_t tok = toks[k];
      const int64_t col = c0 + seg * V;
      Chunk<T> v = load_chunk(tok >= 0 ? p.q + tok * p.ld_q : nullptr, col, p.C, p.q_vec_ok);
      const uint32_t key = dropout_row_key(seed, static_cast<uint32_t>(tok));
#pragma unroll
      for (int j = 0; j < V; ++j) {
        qsl[seg * V + j][k] = p.dropout.enabled ? dropout_value(v.v[j], p.dropout, key, col + j) : v.v[j];
      }
    }
    __syncthreads();
    tile_mma_parts(psl, qsl, acc);
    __syncthreads();
  }

  const int64_t slot = job_slot(p, job);
  for_each_acc(acc, [&](int row, int col, float v) {
    const int64_t m = m0 + row, c = c0 + col;
    if (m >= p.rows || c >= p.C) return;
    if (p.splits == 1) {
      *out_ptr(p, job, m, c) = from_f32<T>(v);
    } else {
      p.workspace[((slot * p.splits + split) * p.rows + m) * p.C + c] = v;
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(256) wgrad_reduce_kernel(const WgradParams<T> p, int jobs) {
  const int64_t per_job = static_cast<int64_t>(p.rows) * p.C;
  const int64_t total = jobs * per_job;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int job = static_cast<int>(i / per_job);
    const int64_t m = (i % per_job) / p.C, c = i % p.C;
    float s = 0.0f;
    if (job_trainable(p, job)) {
      const float* w = p.workspace + (job_slot(p, job) * p.splits * p.rows + m) * p.C + c;
      for (int sp = 0; sp < p.splits; ++sp) s += w[sp * per_job];
    }
    *out_ptr(p, job, m, c) = from_f32<T>(s);
  }
}

int popcount64(uint64_t v) {
  int n = 0;
  for (; v != 0; v &= v - 1) ++n;
  return n;
}

}  // namespace
}  // namespace detail

Status wgrad(const WgradArgs& a) {
  using namespace detail;
  constexpr const char* kOp = "wgrad";
  MOECL_RETURN_IF_ERROR(check_dtype(kOp, a.dtype));
  MOECL_RETURN_IF_ERROR(check_routing(kOp, a.route));
  MOECL_RETURN_IF_ERROR(check_dropout(kOp, a.dropout));
  MOECL_REQUIRE(a.rows >= 1 && a.rows <= kMaxRank, "rows=", a.rows, " is outside [1, ", kMaxRank, "]");
  MOECL_REQUIRE(a.C >= 1, "C=", a.C, " must be >= 1");
  MOECL_REQUIRE(a.splits >= 1 && a.splits <= kMaxSplits, "splits=", a.splits, " is outside [1, ", kMaxSplits, "]");
  MOECL_REQUIRE(a.coef_col == 0 || a.coef_col == 1, "coef_col=", a.coef_col, " must be 0 or 1");
  const int jobs = a.per_expert ? a.route.num_experts : 1;
  const uint64_t all = a.route.num_experts == 64 ? ~0ull : ((1ull << a.route.num_experts) - 1ull);
  MOECL_REQUIRE(!a.per_expert || (a.trainable & ~all) == 0, "trainable mask has bits beyond num_experts=",
                a.route.num_experts);
  const int n_trainable = a.per_expert ? popcount64(a.trainable) : 1;
  const int64_t need = a.splits == 1 ? 0 : static_cast<int64_t>(n_trainable) * a.splits * a.rows * a.C;
  MOECL_REQUIRE(a.workspace_elems >= need, "workspace has ", a.workspace_elems,
                " elements, needs trainable_jobs*splits*rows*C = ", need);
  if (need > 0) MOECL_RETURN_IF_ERROR(check_pointer(kOp, "workspace", a.workspace, 4));
  const int esize = dtype_size(a.dtype);
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "out", a.out, esize));
  MOECL_REQUIRE(a.out_stride_m >= 0 && a.out_stride_c >= 0 && a.out_stride_e >= 0, "out has a negative stride");
  if (a.route.num_tokens > 0) {
    MOECL_RETURN_IF_ERROR(check_pointer(kOp, "p", a.p, 4));
    MOECL_REQUIRE(a.ld_p >= a.rows, "ld_p=", a.ld_p, " is smaller than rows=", a.rows);
    MOECL_RETURN_IF_ERROR(check_pointer(kOp, "q", a.q, esize));
    MOECL_REQUIRE(a.ld_q >= a.C, "ld_q=", a.ld_q, " is smaller than C=", a.C);
    if (a.coef != nullptr) MOECL_RETURN_IF_ERROR(check_pointer(kOp, "coef", a.coef, 4));
  }

  const int64_t c_tiles = (a.C + kBN - 1) / kBN;
  const int64_t m_tiles = (a.rows + kBM - 1) / kBM;
  MOECL_REQUIRE(c_tiles * m_tiles <= INT32_MAX, "C=", a.C, " is too large for the grid");
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    WgradParams<T> p;
    p.p = a.p;
    p.ld_p = a.ld_p;
    p.rows = a.rows;
    p.coef = a.coef;
    p.coef_col = a.coef_col;
    p.scale = a.scale;
    p.q = static_cast<const T*>(a.q);
    p.ld_q = a.ld_q;
    p.C = a.C;
    p.q_vec_ok = reinterpret_cast<uintptr_t>(a.q) % 16 == 0 && a.ld_q % kVec<T> == 0;
    p.dropout = a.dropout;
    p.route = a.route;
    p.per_expert = a.per_expert;
    p.trainable = a.trainable;
    p.out = static_cast<T*>(a.out);
    p.out_sm = a.out_stride_m;
    p.out_sc = a.out_stride_c;
    p.out_se = a.out_stride_e;
    p.workspace = a.workspace;
    p.splits = a.splits;
    p.c_tiles = static_cast<int>(c_tiles);
    const dim3 grid(static_cast<unsigned>(c_tiles * m_tiles), static_cast<unsigned>(a.splits),
                    static_cast<unsigned>(jobs));
    wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    MOECL_RETURN_IF_ERROR(launch_status(kOp));
    if (a.splits > 1) {
      const int64_t total = jobs * static_cast<int64_t>(a.rows) * a.C;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
      wgrad_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p, jobs);
      MOECL_RETURN_IF_ERROR(launch_status(kOp));
    }
    return Status{};
  });
}

}  // namespace moecl

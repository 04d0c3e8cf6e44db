// Host-side argument checks shared by the launchers.
#include <cmath>
#include <string>

#include "common.cuh"

namespace moecl {

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

namespace detail {

int dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

Status check_dtype(const char* kOp, DType dt) {
  const int code = static_cast<int>(dt);
  MOECL_REQUIRE(code >= 0 && code <= 2, "dtype code ", code, " is not one of 0 (fp32), 1 (fp16), 2 (bf16)");
  return {};
}

Status check_routing(const char* kOp, const Routing& rt) {
  MOECL_REQUIRE(rt.num_tokens >= 0, "num_tokens=", rt.num_tokens, " must be >= 0");
  MOECL_REQUIRE(rt.num_tokens <= INT32_MAX, "num_tokens=", rt.num_tokens, " exceeds the int32 token index range");
  MOECL_REQUIRE(rt.num_experts >= 1 && rt.num_experts <= kMaxExperts, "num_experts=", rt.num_experts,
                " is outside [1, ", kMaxExperts, "] supported by the cuda backend");
  if (rt.offsets != nullptr) {
    MOECL_REQUIRE(rt.sorted_idx != nullptr || rt.num_tokens == 0,
                  "routing has expert offsets but no sorted_idx (mixed routing needs both)");
  } else {
    MOECL_REQUIRE(rt.sorted_idx == nullptr, "routing has sorted_idx but no expert offsets");
    MOECL_REQUIRE(rt.single_task >= -1 && rt.single_task < rt.num_experts, "single_task=", rt.single_task,
                  " is outside [-1, ", rt.num_experts - 1, "]");
  }
  return {};
}

Status check_dropout(const char* kOp, const Dropout& d) {
  if (!d.enabled) return {};
  MOECL_REQUIRE(d.threshold <= (1u << 24), "dropout threshold ", d.threshold, " exceeds 2**24");
  MOECL_REQUIRE(std::isfinite(d.keep_scale) && d.keep_scale >= 1.0f, "dropout keep_scale ", d.keep_scale,
                " must be finite and >= 1 (1 / (1 - p))");
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, "dropout seed", d.seed, 8));
  return {};
}

Status check_pointer(const char* kOp, const char* name, const void* p, int align) {
  MOECL_REQUIRE(p != nullptr, name, " is null");
  MOECL_REQUIRE(reinterpret_cast<uintptr_t>(p) % align == 0, name, " is not ", align, "-byte aligned");
  return {};
}

Status check_matrix(const char* kOp, const char* name, const Matrix& m, DType dt) {
  MOECL_RETURN_IF_ERROR(check_pointer(kOp, name, m.data, dtype_size(dt)));
  MOECL_REQUIRE(m.stride_n >= 0 && m.stride_k >= 0 && m.stride_e >= 0, name, " has a negative stride");
  return {};
}

int64_t tile_upper_bound(const Routing& rt, int rows) {
  const int64_t tiles = (rt.num_tokens + rows - 1) / rows;
  return rt.offsets == nullptr ? tiles : tiles + rt.num_experts + 1;  // each group adds <= 1 partial tile
}

Status launch_status(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return {};
  return Status{Code::kCudaError,
                std::string("moecl.") + op + ": kernel launch failed: " + cudaGetErrorName(err) + ": " +
                    cudaGetErrorString(err)};
}

}  // namespace detail
}  // namespace moecl

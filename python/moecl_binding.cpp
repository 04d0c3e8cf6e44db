// pybind11 module moecl_kernels._C: thin wrappers over the torch-free launchers in csrc/.
//
// Tensors cross the boundary as raw device pointers (tensor.data_ptr()) with explicit
// sizes and strides, the stream as an int (torch.cuda.current_stream().cuda_stream).
// No torch headers: the module has no ABI coupling to any torch version. Composite
// arguments are tuples:
//   matrix  = (data_ptr, stride_n, stride_k, stride_e)
//   routing = (sorted_idx_ptr or 0, offsets_ptr or 0, single_task, num_tokens, num_experts)
//   dropout = (enabled, seed_ptr (int64 on the device, or 0 when disabled), threshold24, keep_scale)
// A launcher's invalid-argument status raises ValueError, a CUDA launch error RuntimeError.
// moecl_kernels/backends/cuda.py is the only caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "moecl_kernels.h"

#ifndef MOECL_VERSION
#error "MOECL_VERSION must be defined by the build (the package version)"
#endif
#ifndef MOECL_ARCHS
#define MOECL_ARCHS "unknown"
#endif
#ifndef MOECL_NVCC_VERSION
#define MOECL_NVCC_VERSION "unknown"
#endif
#ifndef MOECL_GIT_HASH
#define MOECL_GIT_HASH "unknown"
#endif

namespace py = pybind11;

namespace {

using MatrixT = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t>;
using RoutingT = std::tuple<std::uintptr_t, std::uintptr_t, int32_t, int64_t, int32_t>;
using DropoutT = std::tuple<bool, std::uintptr_t, uint32_t, float>;

template <typename P = void>
P* ptr(std::uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

moecl::Matrix to_matrix(const MatrixT& m) {
  moecl::Matrix out;
  out.data = ptr<const void>(std::get<0>(m));
  out.stride_n = std::get<1>(m);
  out.stride_k = std::get<2>(m);
  out.stride_e = std::get<3>(m);
  return out;
}

moecl::Routing to_routing(const RoutingT& r) {
  moecl::Routing out;
  out.sorted_idx = ptr<const int32_t>(std::get<0>(r));
  out.offsets = ptr<const int32_t>(std::get<1>(r));
  out.single_task = std::get<2>(r);
  out.num_tokens = std::get<3>(r);
  out.num_experts = std::get<4>(r);
  return out;
}

moecl::Dropout to_dropout(const DropoutT& d) {
  moecl::Dropout out;
  out.enabled = std::get<0>(d);
  out.seed = ptr<const int64_t>(std::get<1>(d));
  out.threshold = std::get<2>(d);
  out.keep_scale = std::get<3>(d);
  return out;
}

moecl::DType to_dtype(int code) {
  if (code < 0 || code > 2) throw py::value_error("moecl: dtype code " + std::to_string(code) + " is not 0 (fp32), 1 (fp16) or 2 (bf16)");
  return static_cast<moecl::DType>(code);
}

// Runs a launcher without the GIL and turns its Status into a Python exception.
template <typename Args>
void run(moecl::Status (*launcher)(const Args&), const Args& args) {
  moecl::Status s;
  {
    py::gil_scoped_release release;
    s = launcher(args);
  }
  if (s.code == moecl::Code::kInvalidArgument) throw py::value_error(s.message);
  if (s.code != moecl::Code::kOk) throw std::runtime_error(s.message);
}

void shrink(int dtype, std::uintptr_t input, int64_t ld_input, int64_t K, const MatrixT& shared, const MatrixT& task,
            int r, std::uintptr_t gate, const RoutingT& route, const DropoutT& dropout, std::uintptr_t partial,
            int64_t partial_elems, int splits, std::uintptr_t stream) {
  moecl::ShrinkArgs a;
  a.dtype = to_dtype(dtype);
  a.input = ptr<const void>(input);
  a.ld_input = ld_input;
  a.K = K;
  a.shared = to_matrix(shared);
  a.task = to_matrix(task);
  a.r = r;
  a.gate = ptr<const void>(gate);
  a.route = to_routing(route);
  a.dropout = to_dropout(dropout);
  a.partial = ptr<float>(partial);
  a.partial_elems = partial_elems;
  a.splits = splits;
  a.stream = ptr(stream);
  run(&moecl::shrink, a);
}

void shrink_forward_finalize(std::uintptr_t partial, int splits, int64_t num_tokens, int r, std::uintptr_t token_task,
                             bool gate, std::uintptr_t h_shared, std::uintptr_t h_task, std::uintptr_t coef,
                             std::uintptr_t stream) {
  moecl::ShrinkForwardFinalizeArgs a;
  a.partial = ptr<const float>(partial);
  a.splits = splits;
  a.num_tokens = num_tokens;
  a.r = r;
  a.token_task = ptr<const int32_t>(token_task);
  a.gate = gate;
  a.h_shared = ptr<float>(h_shared);
  a.h_task = ptr<float>(h_task);
  a.coef = ptr<float>(coef);
  a.stream = ptr(stream);
  run(&moecl::shrink_forward_finalize, a);
}

void shrink_backward_finalize(std::uintptr_t partial, int splits, int64_t num_tokens, int r,
                              std::uintptr_t token_task, std::uintptr_t h_shared, std::uintptr_t h_task,
                              std::uintptr_t coef, float scale, std::uintptr_t dh_shared, std::uintptr_t dh_task,
                              std::uintptr_t dlogits, std::uintptr_t stream) {
  moecl::ShrinkBackwardFinalizeArgs a;
  a.partial = ptr<const float>(partial);
  a.splits = splits;
  a.num_tokens = num_tokens;
  a.r = r;
  a.token_task = ptr<const int32_t>(token_task);
  a.h_shared = ptr<const float>(h_shared);
  a.h_task = ptr<const float>(h_task);
  a.coef = ptr<const float>(coef);
  a.scale = scale;
  a.dh_shared = ptr<float>(dh_shared);
  a.dh_task = ptr<float>(dh_task);
  a.dlogits = ptr<float>(dlogits);
  a.stream = ptr(stream);
  run(&moecl::shrink_backward_finalize, a);
}

void expand(int dtype, std::uintptr_t out, int64_t ld_out, int64_t N, std::uintptr_t h_shared, std::uintptr_t h_task,
            int r, std::uintptr_t coef, float scale, const MatrixT& shared, const MatrixT& task, const RoutingT& route,
            const DropoutT& dropout, std::uintptr_t dlogits, std::uintptr_t gate, std::uintptr_t stream) {
  moecl::ExpandArgs a;
  a.dtype = to_dtype(dtype);
  a.out = ptr(out);
  a.ld_out = ld_out;
  a.N = N;
  a.h_shared = ptr<const float>(h_shared);
  a.h_task = ptr<const float>(h_task);
  a.r = r;
  a.coef = ptr<const float>(coef);
  a.scale = scale;
  a.shared = to_matrix(shared);
  a.task = to_matrix(task);
  a.route = to_routing(route);
  a.dropout = to_dropout(dropout);
  a.dlogits = ptr<const float>(dlogits);
  a.gate = ptr<const void>(gate);
  a.stream = ptr(stream);
  run(&moecl::expand, a);
}

void wgrad(int dtype, std::uintptr_t p, int64_t ld_p, int rows, std::uintptr_t coef, int coef_col, float scale,
           std::uintptr_t q, int64_t ld_q, int64_t C, const DropoutT& dropout, const RoutingT& route, bool per_expert,
           uint64_t trainable, std::uintptr_t out, int64_t out_stride_m, int64_t out_stride_c, int64_t out_stride_e,
           std::uintptr_t workspace, int64_t workspace_elems, int splits, std::uintptr_t stream) {
  moecl::WgradArgs a;
  a.dtype = to_dtype(dtype);
  a.p = ptr<const float>(p);
  a.ld_p = ld_p;
  a.rows = rows;
  a.coef = ptr<const float>(coef);
  a.coef_col = coef_col;
  a.scale = scale;
  a.q = ptr<const void>(q);
  a.ld_q = ld_q;
  a.C = C;
  a.dropout = to_dropout(dropout);
  a.route = to_routing(route);
  a.per_expert = per_expert;
  a.trainable = trainable;
  a.out = ptr(out);
  a.out_stride_m = out_stride_m;
  a.out_stride_c = out_stride_c;
  a.out_stride_e = out_stride_e;
  a.workspace = ptr<float>(workspace);
  a.workspace_elems = workspace_elems;
  a.splits = splits;
  a.stream = ptr(stream);
  run(&moecl::wgrad, a);
}

py::dict build_info() {
  py::dict d;
  d["version"] = MOECL_VERSION;
  py::list archs;
  const std::string list = MOECL_ARCHS;  // "sm_80,sm_90a" (compute_XX = embedded PTX)
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = list.find(',', start);
    const std::string item = list.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) archs.append(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  d["archs"] = archs;
  d["nvcc"] = MOECL_NVCC_VERSION;
  d["cuda_runtime"] = moecl::cuda_version();
  d["git"] = MOECL_GIT_HASH;
  d["max_rank"] = moecl::kMaxRank;
  d["max_experts"] = moecl::kMaxExperts;
  d["max_splits"] = moecl::kMaxSplits;
  d["tile"] = moecl::kTile;
  d["rank_chunk"] = moecl::kRankChunk;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moecl CUDA kernels (torch-free launchers; see moecl_kernels/backends/cuda.py)";
  m.attr("__version__") = MOECL_VERSION;
  m.def("build_info", &build_info, "Version, target archs, nvcc / CUDA runtime versions, git hash, kernel limits.");
  m.def("shrink", &shrink, py::arg("dtype"), py::arg("input"), py::arg("ld_input"), py::arg("K"), py::arg("shared"),
        py::arg("task"), py::arg("r"), py::arg("gate"), py::arg("route"), py::arg("dropout"), py::arg("partial"),
        py::arg("partial_elems"), py::arg("splits"), py::arg("stream"));
  m.def("shrink_forward_finalize", &shrink_forward_finalize, py::arg("partial"), py::arg("splits"),
        py::arg("num_tokens"), py::arg("r"), py::arg("token_task"), py::arg("gate"), py::arg("h_shared"),
        py::arg("h_task"), py::arg("coef"), py::arg("stream"));
  m.def("shrink_backward_finalize", &shrink_backward_finalize, py::arg("partial"), py::arg("splits"),
        py::arg("num_tokens"), py::arg("r"), py::arg("token_task"), py::arg("h_shared"), py::arg("h_task"),
        py::arg("coef"), py::arg("scale"), py::arg("dh_shared"), py::arg("dh_task"), py::arg("dlogits"),
        py::arg("stream"));
  m.def("expand", &expand, py::arg("dtype"), py::arg("out"), py::arg("ld_out"), py::arg("N"), py::arg("h_shared"),
        py::arg("h_task"), py::arg("r"), py::arg("coef"), py::arg("scale"), py::arg("shared"), py::arg("task"),
        py::arg("route"), py::arg("dropout"), py::arg("dlogits"), py::arg("gate"), py::arg("stream"));
  m.def("wgrad", &wgrad, py::arg("dtype"), py::arg("p"), py::arg("ld_p"), py::arg("rows"), py::arg("coef"),
        py::arg("coef_col"), py::arg("scale"), py::arg("q"), py::arg("ld_q"), py::arg("C"), py::arg("dropout"),
        py::arg("route"), py::arg("per_expert"), py::arg("trainable"), py::arg("out"), py::arg("out_stride_m"),
        py::arg("out_stride_c"), py::arg("out_stride_e"), py::arg("workspace"), py::arg("workspace_elems"),
        py::arg("splits"), py::arg("stream"));
}

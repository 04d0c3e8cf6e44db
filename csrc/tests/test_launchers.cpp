// Host-only tests of the launchers: argument checks (every error names its argument and
// nothing is launched) and the dropout hash against values from moecl_kernels/ops/dropout.py.
// Needs no GPU: every case below fails validation or has zero tokens before any CUDA call.
// Run: cmake -S . -B build/cmake && cmake --build build/cmake && ctest --test-dir build/cmake
#include <cstdio>
#include <string>

#include "dropout_hash.h"
#include "moecl_kernels.h"

namespace {

int failures = 0;

void expect(bool cond, const std::string& what) {
  if (!cond) {
    std::printf("FAIL: %s\n", what.c_str());
    ++failures;
  }
}

// The status is an invalid-argument error whose message contains `needle`.
void expect_invalid(const moecl::Status& s, const std::string& needle) {
  expect(s.code == moecl::Code::kInvalidArgument, "expected an invalid-argument error mentioning '" + needle +
                                                      "', got code " + std::to_string(static_cast<int>(s.code)) +
                                                      " '" + s.message + "'");
  expect(s.message.find(needle) != std::string::npos, "message '" + s.message + "' does not mention '" + needle + "'");
}

void test_dropout_hash() {
  struct Case {
    uint32_t seed, row, col, key, hash;
  };
  // key/hash computed by moecl_kernels.ops.dropout (int64 emulation of the uint32 arithmetic)
  const Case cases[] = {
      {0u, 0u, 0u, 0xd9aaf7d3u, 0xe32f7d73u},
      {1234u, 5u, 17u, 0xce728505u, 0x3cc878b8u},
      {4294967295u, 70000u, 4095u, 0x019b2f32u, 0x493de0acu},
      {987654321u, 1u, 1048579u, 0x931f7078u, 0x2e9500a0u},
  };
  for (const Case& c : cases) {
    const uint32_t key = moecl::dropout_row_key(c.seed, c.row);
    expect(key == c.key, "dropout_row_key(seed=" + std::to_string(c.seed) + ", row=" + std::to_string(c.row) + ")");
    expect(moecl::fmix32(key ^ (c.col * 0x85EBCA77u)) == c.hash, "dropout hash of col " + std::to_string(c.col));
    const uint32_t half = 1u << 23;  // threshold24(0.5)
    expect(moecl::dropout_keep(key, c.col, half) == ((c.hash >> 8) >= half), "dropout_keep threshold compare");
  }
}

moecl::Routing routing(int64_t T, int E) {
  moecl::Routing rt;
  rt.num_tokens = T;
  rt.num_experts = E;
  rt.single_task = 0;
  return rt;
}

// A fake, aligned, never dereferenced device address.
const void* fake(uintptr_t v = 0x10000) { return reinterpret_cast<const void*>(v); }

moecl::ShrinkArgs valid_shrink() {
  moecl::ShrinkArgs a;
  a.dtype = moecl::DType::kBFloat16;
  a.input = fake();
  a.ld_input = 64;
  a.K = 64;
  a.shared.data = fake();
  a.shared.stride_n = 64;
  a.shared.stride_k = 1;
  a.task.data = fake();
  a.task.stride_n = 64;
  a.task.stride_k = 1;
  a.task.stride_e = 64 * 8;
  a.r = 8;
  a.route = routing(0, 2);  // zero tokens: valid arguments launch nothing
  a.partial = reinterpret_cast<float*>(0x20000);
  a.partial_elems = 0;
  return a;
}

void test_shrink_checks() {
  expect(moecl::shrink(valid_shrink()).ok(), "shrink with zero tokens is ok: " + moecl::shrink(valid_shrink()).message);
  auto a = valid_shrink();
  a.r = 129;
  expect_invalid(moecl::shrink(a), "r=129");
  a = valid_shrink();
  a.r = 0;
  expect_invalid(moecl::shrink(a), "r=0");
  a = valid_shrink();
  a.route.num_experts = 65;
  expect_invalid(moecl::shrink(a), "num_experts=65");
  a = valid_shrink();
  a.route.single_task = 2;
  expect_invalid(moecl::shrink(a), "single_task=2");
  a = valid_shrink();
  a.route.offsets = reinterpret_cast<const int32_t*>(fake());
  a.route.num_tokens = 4;
  expect_invalid(moecl::shrink(a), "sorted_idx");
  a = valid_shrink();
  a.splits = 0;
  expect_invalid(moecl::shrink(a), "splits=0");
  a = valid_shrink();
  a.dtype = static_cast<moecl::DType>(7);
  expect_invalid(moecl::shrink(a), "dtype code 7");
  a = valid_shrink();
  a.dropout.enabled = true;
  a.dropout.seed = reinterpret_cast<const int64_t*>(fake(0x40000));
  a.dropout.threshold = (1u << 24) + 1;
  expect_invalid(moecl::shrink(a), "threshold");
  a.dropout.threshold = 1u << 23;
  a.dropout.seed = nullptr;  // the seed lives on the device: a pointer, required when enabled
  expect_invalid(moecl::shrink(a), "dropout seed is null");
  a.dropout.seed = reinterpret_cast<const int64_t*>(fake(0x40004));
  expect_invalid(moecl::shrink(a), "dropout seed is not 8-byte aligned");
  a = valid_shrink();
  a.route.num_tokens = 10;
  a.partial_elems = 10;
  expect_invalid(moecl::shrink(a), "partial has 10 elements");
  a.partial_elems = 10 * 18;
  a.input = nullptr;
  expect_invalid(moecl::shrink(a), "input is null");
  a.input = fake(0x10001);
  expect_invalid(moecl::shrink(a), "input is not 2-byte aligned");
  a.input = fake();
  a.ld_input = 63;
  expect_invalid(moecl::shrink(a), "ld_input=63");
  a.ld_input = 64;
  a.task.data = nullptr;
  expect_invalid(moecl::shrink(a), "task is null");
  a.task.data = fake();
  a.shared.stride_n = -1;
  expect_invalid(moecl::shrink(a), "shared has a negative stride");
}

void test_finalize_checks() {
  moecl::ShrinkForwardFinalizeArgs f;
  f.r = 8;
  f.num_tokens = 0;
  expect(moecl::shrink_forward_finalize(f).ok(), "forward finalize with zero tokens is ok");
  f.num_tokens = 5;
  expect_invalid(moecl::shrink_forward_finalize(f), "partial is null");
  moecl::ShrinkBackwardFinalizeArgs b;
  b.r = 200;
  expect_invalid(moecl::shrink_backward_finalize(b), "r=200");
  b.r = 4;
  b.num_tokens = 3;
  b.partial = reinterpret_cast<const float*>(fake());
  b.token_task = reinterpret_cast<const int32_t*>(fake());
  b.h_shared = b.h_task = b.coef = reinterpret_cast<const float*>(fake());
  b.dh_shared = reinterpret_cast<float*>(0x30000);
  expect_invalid(moecl::shrink_backward_finalize(b), "dh_task is null");
}

void test_expand_checks() {
  moecl::ExpandArgs a;
  a.dtype = moecl::DType::kFloat16;
  a.N = 0;
  a.r = 4;
  a.route = routing(0, 1);
  expect_invalid(moecl::expand(a), "N=0");
  a.N = 16;
  expect(moecl::expand(a).ok(), "expand with zero tokens is ok");
  a.route.num_tokens = 3;
  expect_invalid(moecl::expand(a), "out is null");
  a.out = reinterpret_cast<void*>(0x40000);
  a.ld_out = 8;
  expect_invalid(moecl::expand(a), "ld_out=8");
  a.ld_out = 16;
  a.h_shared = a.h_task = reinterpret_cast<const float*>(fake());
  a.shared.data = a.task.data = fake();
  a.dlogits = reinterpret_cast<const float*>(fake());
  expect_invalid(moecl::expand(a), "gate is null");
}

void test_wgrad_checks() {
  moecl::WgradArgs a;
  a.dtype = moecl::DType::kFloat32;
  a.rows = 8;
  a.C = 32;
  a.route = routing(0, 3);
  a.out = reinterpret_cast<void*>(0x40000);
  a.out_stride_m = 32;
  a.out_stride_c = 1;
  a.per_expert = true;
  a.trainable = 0b1000;
  expect_invalid(moecl::wgrad(a), "trainable mask");
  a.trainable = 0b101;
  a.splits = 4;
  expect_invalid(moecl::wgrad(a), "workspace has 0 elements");
  a.workspace_elems = 2 * 4 * 8 * 32;
  expect_invalid(moecl::wgrad(a), "workspace is null");
  a.coef_col = 2;
  expect_invalid(moecl::wgrad(a), "coef_col=2");
  a.coef_col = 0;
  a.rows = 0;
  expect_invalid(moecl::wgrad(a), "rows=0");
}

}  // namespace

int main() {
  test_dropout_hash();
  test_shrink_checks();
  test_finalize_checks();
  test_expand_checks();
  test_wgrad_checks();
  if (failures == 0) std::printf("moecl launcher tests: all passed\n");
  return failures == 0 ? 0 : 1;
}

// The kernels compiled for AVX2 + FMA + F16C (x86-64 only); chosen at run time when the CPU
// has these instructions. No torch headers here: only the kernels get the ISA flags.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "args.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
namespace fascore_native {
namespace avx2 {
#include "simd_avx2.h"
#include "kernels_impl.h"
}  // namespace avx2
}  // namespace fascore_native
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

namespace fascore_native {
namespace avx2 {
bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
}  // namespace avx2
}  // namespace fascore_native
#else
namespace fascore_native {
namespace avx2 {
bool supported() { return false; }
int forward(const Args&) { return 1; }
int backward(const Args&) { return 1; }
const char* isa_name() { return "avx2"; }
int64_t scratch_bytes(const Args&, bool) { return 0; }
}  // namespace avx2
}  // namespace fascore_native
#endif

// The kernels on the portable 8-lane layer: any CPU (used where AVX2 + FMA + F16C are missing).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "args.h"

namespace fascore_native {
namespace generic {
#include "simd_generic.h"
#include "kernels_impl.h"
}  // namespace generic
}  // namespace fascore_native

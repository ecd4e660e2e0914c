// Portable 8-lane float "SIMD" layer (plain loops; the compiler vectorises what it can).
// Same interface as simd_avx2.h. Masks are lanes with all-ones / all-zeros bit patterns.

struct vf {
  float x[8];
};

static inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline vf vzero() {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = 0.f;
  return r;
}
static inline vf vset1(float v) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = v;
  return r;
}
static inline vf vld(const float* p) {
  vf r;
  std::memcpy(r.x, p, 32);
  return r;
}
static inline void vst(float* p, vf a) { std::memcpy(p, a.x, 32); }
#define FASCORE_BINOP(name, expr)              \
  static inline vf name(vf a, vf b) {          \
    vf r;                                      \
    for (int t = 0; t < 8; ++t) {              \
      float x = a.x[t], y = b.x[t];            \
      r.x[t] = (expr);                         \
    }                                          \
    return r;                                  \
  }
FASCORE_BINOP(vadd, x + y)
FASCORE_BINOP(vsub, x - y)
FASCORE_BINOP(vmul, x * y)
FASCORE_BINOP(vdiv, x / y)
// Same NaN rule as x86 max/min: the second operand when either is NaN.
FASCORE_BINOP(vmax, x > y ? x : y)
FASCORE_BINOP(vmin, x < y ? x : y)
#undef FASCORE_BINOP
static inline vf vfma(vf a, vf b, vf c) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = a.x[t] * b.x[t] + c.x[t];
  return r;
}
static inline vf vsqrt(vf a) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = std::sqrt(a.x[t]);
  return r;
}
static inline vf vand(vf a, vf m) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f(f2u(a.x[t]) & f2u(m.x[t]));
  return r;
}
static inline vf vor(vf a, vf b) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f(f2u(a.x[t]) | f2u(b.x[t]));
  return r;
}
static inline vf vblend(vf a, vf b, vf m) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = f2u(m.x[t]) ? b.x[t] : a.x[t];
  return r;
}
static inline vf visnan(vf a) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f(a.x[t] != a.x[t] ? 0xFFFFFFFFu : 0u);
  return r;
}
static inline vf veq(vf a, vf b) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f(a.x[t] == b.x[t] ? 0xFFFFFFFFu : 0u);
  return r;
}
static inline bool vany(vf m) {
  for (int t = 0; t < 8; ++t)
    if (f2u(m.x[t])) return true;
  return false;
}
static inline float vhsum(vf a) {
  float s0 = a.x[0] + a.x[4], s1 = a.x[1] + a.x[5], s2 = a.x[2] + a.x[6], s3 = a.x[3] + a.x[7];
  return (s0 + s2) + (s1 + s3);
}
static inline float vhmax(vf a) {
  float m = a.x[0];
  for (int t = 1; t < 8; ++t) m = a.x[t] > m ? a.x[t] : m;
  return m;
}
static inline vf vrange(int64_t c, int64_t lo, int64_t hi) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f((c + t >= lo && c + t < hi) ? 0xFFFFFFFFu : 0u);
  return r;
}
static inline vf vbytes_zero(const uint8_t* p) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f(p[t] == 0 ? 0xFFFFFFFFu : 0u);
  return r;
}
static inline vf vbytes_nonzero(const uint8_t* p) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f(p[t] != 0 ? 0xFFFFFFFFu : 0u);
  return r;
}
static inline float h2f(uint16_t h);
static inline vf vld_f16(const uint16_t* p) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = h2f(p[t]);
  return r;
}
static inline vf vld_bf16(const uint16_t* p) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = u2f((uint32_t)p[t] << 16);
  return r;
}
static inline vf vabs_iota(int64_t base) {
  vf r;
  for (int t = 0; t < 8; ++t) {
    int64_t x = base + t;
    r.x[t] = (float)(x < 0 ? -x : x);
  }
  return r;
}
static inline vf vexp(vf a) {
  vf r;
  for (int t = 0; t < 8; ++t) r.x[t] = std::exp(a.x[t]);
  return r;
}
static inline void vtranspose8(vf* r) {
  for (int a = 0; a < 8; ++a)
    for (int b = a + 1; b < 8; ++b) {
      float t = r[a].x[b];
      r[a].x[b] = r[b].x[a];
      r[b].x[a] = t;
    }
}
static inline void philox8(const uint32_t* lo, const uint32_t* hi, uint32_t k0in, uint32_t k1in, int rounds,
                           uint32_t out[4][8]) {
  for (int t = 0; t < 8; ++t) {
    uint32_t c0 = lo[t], c1 = hi[t], c2 = 0, c3 = 0, k0 = k0in, k1 = k1in;
    for (int r = 0; r < rounds; ++r) {
      if (r) {
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
      uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
      c1 = (uint32_t)p1;
      c3 = (uint32_t)p0;
      c0 = n0;
      c2 = n2;
    }
    out[0][t] = c0;
    out[1][t] = c1;
    out[2][t] = c2;
    out[3][t] = c3;
  }
}
static inline void vkeep32(const uint8_t* bytes, int thresh, uint8_t* keep) {
  for (int t = 0; t < 32; ++t) keep[t] = bytes[t] <= thresh ? 1 : 0;
}

#define FASCORE_ISA_NAME "generic"

// 8-lane float SIMD layer on AVX2 + FMA + F16C. Included inside a namespace and a
// `#pragma GCC target("avx2,fma,f16c")` region by kernels_avx2.cpp; <immintrin.h> comes first.
// Masks are float vectors whose lanes are all-ones or all-zeros bit patterns.

typedef __m256 vf;
typedef __m256i vi;

static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vld(const float* p) { return _mm256_loadu_ps(p); }
static inline void vst(float* p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, one rounding
static inline vf vsqrt(vf a) { return _mm256_sqrt_ps(a); }
static inline vf vand(vf a, vf m) { return _mm256_and_ps(a, m); }
static inline vf vor(vf a, vf b) { return _mm256_or_ps(a, b); }
static inline vf vblend(vf a, vf b, vf m) { return _mm256_blendv_ps(a, b, m); }  // m ? b : a
static inline vf visnan(vf a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
static inline vf veq(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
static inline bool vany(vf m) { return _mm256_movemask_ps(m) != 0; }

static inline float vhsum(vf x) {  // fixed order: (lo + hi), then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float vhmax(vf x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes t with lo <= c + t < hi (all in int32 range).
static inline vf vrange(int64_t c, int64_t lo, int64_t hi) {
  const vi iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  vi idx = _mm256_add_epi32(_mm256_set1_epi32((int32_t)c), iota);
  vi ge = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32((int32_t)(lo - 1)));
  vi lt = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)hi), idx);
  return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
}

// Lanes t whose byte p[t] is zero / nonzero (8 bytes, unit stride).
static inline vi vbytes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
static inline vf vbytes_zero(const uint8_t* p) {
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(vbytes8(p), _mm256_setzero_si256()));
}
static inline vf vbytes_nonzero(const uint8_t* p) {
  vi z = _mm256_cmpeq_epi32(vbytes8(p), _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_xor_si256(z, _mm256_set1_epi32(-1)));
}

static inline vf vld_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline vf vld_bf16(const uint16_t* p) {
  vi w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// |base + t| as float for t = 0..7 (|base| + 8 within int32).
static inline vf vabs_iota(int64_t base) {
  const vi iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  vi x = _mm256_add_epi32(_mm256_set1_epi32((int32_t)base), iota);
  return _mm256_cvtepi32_ps(_mm256_abs_epi32(x));
}

// exp(x) in float32 (Cody-Waite reduction, degree-6 polynomial, ~1 ulp); exp(-inf) = 0,
// exp(+inf) = inf, exp(NaN) = NaN.
static inline vf vexp(vf x) {
  // Clamp (operand order: a NaN x passes through, exp(NaN) = NaN). Below -88 the result is 0:
  // n = -127 there, whose exponent field is 0 (so exp(-inf) = 0 exactly); from 88.376 (n = 128) inf.
  const vf hi = _mm256_set1_ps(88.7228390520683f), lo = _mm256_set1_ps(-88.0f);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: t's low mantissa bits hold n (-127 <= n <= 128)
  const vf magic = _mm256_set1_ps(12582912.0f);
  vf t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  vf fx = _mm256_sub_ps(t, magic);
  vf r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  vf y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
  vf r2 = _mm256_mul_ps(r, r);
  y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n: (bits(t) - bits(magic) + 127) << 23
  vi e = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// In-place transpose of 8 rows of 8 floats.
static inline void vtranspose8(vf* r) {
  vf t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  vf t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  vf t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  vf t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  vf u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  vf u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  vf u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  vf u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Philox4x32 (Random123 round function and key schedule), ROUNDS rounds, on 8 counters at once:
// counter t is (lo[t], hi[t], 0, 0); out[w][t] is word w of counter t's result.
static inline void vmulhilo(vi a, vi m, vi* hi, vi* lo) {
  vi pe = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 as 64-bit products
  vi po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
static inline void philox8(const uint32_t* lo, const uint32_t* hi, uint32_t k0, uint32_t k1, int rounds,
                           uint32_t out[4][8]) {
  vi c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo));
  vi c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi));
  vi c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const vi m0 = _mm256_set1_epi32((int32_t)0xD2511F53u), m1 = _mm256_set1_epi32((int32_t)0xCD9E8D57u);
  for (int r = 0; r < rounds; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    vi hi0, lo0, hi1, lo1;
    vmulhilo(c0, m0, &hi0, &lo0);
    vmulhilo(c2, m1, &hi1, &lo1);
    vi n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int32_t)k0));
    vi n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int32_t)k1));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[0]), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[1]), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[2]), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[3]), c3);
}

// keep[t] = (bytes[t] <= thresh) for 32 bytes.
static inline void vkeep32(const uint8_t* bytes, int thresh, uint8_t* keep) {
  vi x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  vi t = _mm256_set1_epi8((char)(uint8_t)thresh);
  vi le = _mm256_cmpeq_epi8(_mm256_min_epu8(x, t), x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep), _mm256_and_si256(le, _mm256_set1_epi8(1)));
}

#define FASCORE_ISA_NAME "avx2"

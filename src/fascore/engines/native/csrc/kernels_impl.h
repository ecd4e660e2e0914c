// FlashAttentionScore forward / backward on the 8-lane float layer (simd_*.h).
// Included once per ISA inside namespace fascore_native::<isa>; uses no torch headers.
//
// Numerics (SPEC 3, 7): operands are converted to float32 per tile (never the logits to the
// input dtype), logits / statistics / accumulators are float32.
// Parallelism: independent outputs only. Forward work items are (b, kv head, query block), each
// covering the G query heads of the kv head; backward work items are (b, kv head), each owning
// dK / dV of its kv head and dQ of its G query heads. Items are handed out dynamically, but every
// item computes the same bits whichever thread runs it, and every reduction has a fixed order,
// so results do not depend on the thread count.

static const float kNegInf = -std::numeric_limits<float>::infinity();
static const float kFltMax = 3.4028234663852886e38f;
static const int kRounds = 7;  // Ascend's Philox rounds
enum { T_EMPTY = 0, T_PARTIAL = 1, T_FULL = 2 };

static inline int64_t rup(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline int64_t clampi(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

static inline float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, u;
  if (e == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int sh = 0;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        ++sh;
      }
      mant &= 0x3FFu;
      u = sign | ((uint32_t)(127 - 15 + 1 - sh) << 23) | (mant << 13);
    }
  } else if (e == 31) {
    u = sign | 0x7F800000u | (mant << 13);
  } else {
    u = sign | ((e - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float bf2f(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float at_f(const void* base, int dt, int64_t idx) {
  if (dt == DT_F32) return static_cast<const float*>(base)[idx];
  uint16_t h = static_cast<const uint16_t*>(base)[idx];
  return dt == DT_F16 ? h2f(h) : bf2f(h);
}
// base + off elements of dtype dt
static inline const void* eptr(const void* base, int dt, int64_t off) {
  return static_cast<const char*>(base) + off * (dt == DT_F32 ? 4 : 2);
}
static inline float sexp(float x) { return vhmax(vexp(vset1(x))); }  // scalar exp, same as lanes
// max that propagates NaN (torch.maximum / amax semantics)
static inline float nanmax(float a, float b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// n (0..8) elements at base[off + t*st] as floats, zero beyond n.
static inline vf load8(const void* base, int dt, int64_t off, int64_t st, int64_t n) {
  if (n >= 8 && st == 1) {
    if (dt == DT_F32) return vld(static_cast<const float*>(base) + off);
    const uint16_t* p = static_cast<const uint16_t*>(base) + off;
    return dt == DT_F16 ? vld_f16(p) : vld_bf16(p);
  }
  float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t t = 0; t < n && t < 8; ++t) tmp[t] = at_f(base, dt, off + t * st);
  return vld(tmp);
}
// dst[0, npad) = n elements of a strided row, zero filled (npad a multiple of 8).
static inline void load_row(float* dst, const void* base, int dt, int64_t off, int64_t st, int64_t n, int64_t npad) {
  for (int64_t c = 0; c < npad; c += 8) vst(dst + c, load8(base, dt, off + c * st, st, n - c));
}
// dst[0, n) = n elements of a strided row (no padding; any n).
static inline void load_span(float* dst, const void* base, int dt, int64_t off, int64_t st, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) vst(dst + c, load8(base, dt, off + c * st, st, 8));
  for (; c < n; ++c) dst[c] = at_f(base, dt, off + c * st);
}

// ------------------------------------------------------------------------------------------
// GEMM: C[M, N] (+)= A[M, K] B[K, N], float32 accumulation, one thread.
// A(r, k) = A[r * ars + k * aks] (float32, broadcast, any strides); B(k, n) = B[boff + k * ldb + n % 16]
// with boff = (n / 16) * bps (row-major B: bps = 16; packed panels: bps = 16 * K, ldb = 16), B in
// float32, float16 or bfloat16 (BDT; converted as loaded); N is a multiple of 8.
// RS: C is scaled by rs[r] before accumulating.
// ------------------------------------------------------------------------------------------
template <int BDT>
static inline vf bld(const void* B, int64_t idx) {
  if (BDT == DT_F32) return vld(static_cast<const float*>(B) + idx);
  const uint16_t* p = static_cast<const uint16_t*>(B) + idx;
  return BDT == DT_F16 ? vld_f16(p) : vld_bf16(p);
}

template <int MR, int NV, bool ACC, bool RS, int BDT>
static inline void mk(int64_t K, const float* A, int64_t ars, int64_t aks, const void* B, int64_t boff, int64_t ldb,
                      float* C, int64_t ldc, const float* rs) {
  vf c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (ACC) {
        vf x = vld(C + r * ldc + 8 * v);
        c[r][v] = RS ? vmul(x, vset1(rs[r])) : x;
      } else {
        c[r][v] = vzero();
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = bld<BDT>(B, boff + k * ldb + 8 * v);
    const float* a = A + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      vf av = vset1(a[r * ars]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = vfma(av, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vst(C + r * ldc + 8 * v, c[r][v]);
}

template <int NV, bool ACC, bool RS, int BDT>
static inline void mk_rows(int64_t mr, int64_t K, const float* A, int64_t ars, int64_t aks, const void* B,
                           int64_t boff, int64_t ldb, float* C, int64_t ldc, const float* rs) {
  switch (mr) {
    case 6: mk<6, NV, ACC, RS, BDT>(K, A, ars, aks, B, boff, ldb, C, ldc, rs); break;
    case 5: mk<5, NV, ACC, RS, BDT>(K, A, ars, aks, B, boff, ldb, C, ldc, rs); break;
    case 4: mk<4, NV, ACC, RS, BDT>(K, A, ars, aks, B, boff, ldb, C, ldc, rs); break;
    case 3: mk<3, NV, ACC, RS, BDT>(K, A, ars, aks, B, boff, ldb, C, ldc, rs); break;
    case 2: mk<2, NV, ACC, RS, BDT>(K, A, ars, aks, B, boff, ldb, C, ldc, rs); break;
    default: mk<1, NV, ACC, RS, BDT>(K, A, ars, aks, B, boff, ldb, C, ldc, rs); break;
  }
}

template <bool ACC, bool RS, int BDT = DT_F32>
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const void* B,
                 int64_t bps, int64_t ldb, float* C, int64_t ldc, const float* rs) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // C = (rs *) C or 0
    for (int64_t r = 0; r < M; ++r)
      for (int64_t n = 0; n < N; ++n) C[r * ldc + n] = ACC ? (RS ? C[r * ldc + n] * rs[r] : C[r * ldc + n]) : 0.f;
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t boff = (n0 / 16) * bps;
    const bool two = N - n0 >= 16;
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      int64_t mr = M - m0 < 6 ? M - m0 : 6;
      const float* rsm = RS ? rs + m0 : nullptr;
      if (two)
        mk_rows<2, ACC, RS, BDT>(mr, K, A + m0 * ars, ars, aks, B, boff, ldb, C + m0 * ldc + n0, ldc, rsm);
      else
        mk_rows<1, ACC, RS, BDT>(mr, K, A + m0 * ars, ars, aks, B, boff, ldb, C + m0 * ldc + n0, ldc, rsm);
    }
  }
}

// gemm with B of run-time dtype dt
template <bool ACC, bool RS>
static void gemm_dt(int dt, int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const void* B,
                    int64_t bps, int64_t ldb, float* C, int64_t ldc, const float* rs) {
  if (dt == DT_F16)
    gemm<ACC, RS, DT_F16>(M, N, K, A, ars, aks, B, bps, ldb, C, ldc, rs);
  else if (dt == DT_BF16)
    gemm<ACC, RS, DT_BF16>(M, N, K, A, ars, aks, B, bps, ldb, C, ldc, rs);
  else
    gemm<ACC, RS, DT_F32>(M, N, K, A, ars, aks, B, bps, ldb, C, ldc, rs);
}

// S[r, c] = dot(A[r, :K], Bk[c, :K]) for few rows (no packing): A rows lda, Bk rows ldb.
static void sdot(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bk, int64_t ldb,
                 float* S, int64_t lds) {
  const int64_t K8 = K & ~(int64_t)7;
  for (int64_t r = 0; r < M; ++r) {
    const float* a = A + r * lda;
    int64_t c = 0;
    for (; c + 4 <= N; c += 4) {
      const float* b0 = Bk + c * ldb;
      vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
      for (int64_t k = 0; k < K8; k += 8) {
        vf av = vld(a + k);
        s0 = vfma(av, vld(b0 + k), s0);
        s1 = vfma(av, vld(b0 + ldb + k), s1);
        s2 = vfma(av, vld(b0 + 2 * ldb + k), s2);
        s3 = vfma(av, vld(b0 + 3 * ldb + k), s3);
      }
      float t0 = vhsum(s0), t1 = vhsum(s1), t2 = vhsum(s2), t3 = vhsum(s3);
      for (int64_t k = K8; k < K; ++k) {
        t0 += a[k] * b0[k];
        t1 += a[k] * b0[ldb + k];
        t2 += a[k] * b0[2 * ldb + k];
        t3 += a[k] * b0[3 * ldb + k];
      }
      S[r * lds + c] = t0;
      S[r * lds + c + 1] = t1;
      S[r * lds + c + 2] = t2;
      S[r * lds + c + 3] = t3;
    }
    for (; c < N; ++c) {
      const float* b0 = Bk + c * ldb;
      vf s0 = vzero();
      for (int64_t k = 0; k < K8; k += 8) s0 = vfma(vld(a + k), vld(b0 + k), s0);
      float t0 = vhsum(s0);
      for (int64_t k = K8; k < K; ++k) t0 += a[k] * b0[k];
      S[r * lds + c] = t0;
    }
  }
}

// Panels of 16 rows of a strided matrix (nrows x ncols; element (r, c) at src[off + r * rs + c * cs],
// dtype dt), transposed to float32: out[p][c][t] = src(16p + t, c), zero for rows >= nrows.
static void pack_t(float* out, const void* src, int dt, int64_t off, int64_t rs, int64_t cs, int64_t nrows,
                   int64_t ncols) {
  const int64_t npan = (nrows + 15) / 16;
  for (int64_t p = 0; p < npan; ++p) {
    float* dst = out + p * ncols * 16;
    for (int h = 0; h < 2; ++h) {
      const int64_t r0 = 16 * p + 8 * h;
      const int64_t nr = clampi(nrows - r0, 0, 8);
      int64_t k0 = 0;
      for (; k0 + 8 <= ncols; k0 += 8) {
        vf t[8];
        for (int u = 0; u < 8; ++u) t[u] = u < nr ? load8(src, dt, off + (r0 + u) * rs + k0 * cs, cs, 8) : vzero();
        vtranspose8(t);
        for (int x = 0; x < 8; ++x) vst(dst + (k0 + x) * 16 + 8 * h, t[x]);
      }
      for (; k0 < ncols; ++k0)
        for (int u = 0; u < 8; ++u) dst[k0 * 16 + 8 * h + u] = u < nr ? at_f(src, dt, off + (r0 + u) * rs + k0 * cs) : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Masks: tile kinds and per-row take-part rules
// ------------------------------------------------------------------------------------------
static inline int band_kind(const Args& a, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const int64_t dmin = j0 - (i1 - 1), dmax = (j1 - 1) - i0;
  bool full = dmin >= a.lo && dmax <= a.hi;
  bool empty = dmax < a.lo || dmin > a.hi;
  if (a.prefix) {
    const int64_t p = a.prefix[b];
    full = full || j1 <= p;
    empty = empty && j0 >= p;
  }
  return empty ? T_EMPTY : (full ? T_FULL : T_PARTIAL);
}

// Per (bm, nm, query block, key block) of the explicit mask: bit 0 some element masked, bit 1 all.
struct ExSum {
  const Args* a;
  int64_t bq, bk, nq, nk;
  uint8_t* out;
};
static void exsum_body(void* ctx, int64_t begin, int64_t end) {
  const ExSum& e = *static_cast<const ExSum*>(ctx);
  const Args& a = *e.a;
  for (int64_t it = begin; it < end; ++it) {
    const int64_t qb = it % e.nq, bn = it / e.nq, nm = bn % a.Nm, bm = bn / a.Nm;
    const int64_t i0 = qb * e.bq, i1 = std::min(i0 + e.bq, a.Sq);
    uint8_t* o = e.out + it * e.nk;
    for (int64_t kb = 0; kb < e.nk; ++kb) o[kb] = 2;
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = a.ex + bm * a.ex_s[0] + nm * a.ex_s[1] + i * a.ex_s[2];
      const int64_t st = a.ex_s[3];
      for (int64_t kb = 0; kb < e.nk; ++kb) {
        const int64_t j0 = kb * e.bk, j1 = std::min(j0 + e.bk, a.Skv);
        bool any = false, all = true;
        int64_t j = j0;
        if (st == 1) {
          for (; j + 8 <= j1; j += 8) {
            uint64_t x;
            std::memcpy(&x, row + j, 8);
            // bytes are 0/1 (bool) or any uint8: a byte is nonzero iff some bit is set
            uint64_t y = x | (x >> 4);
            y |= y >> 2;
            y |= y >> 1;
            y &= 0x0101010101010101ull;
            any = any || y != 0;
            all = all && y == 0x0101010101010101ull;
          }
        }
        for (; j < j1; ++j) {
          const bool mk_ = row[j * st] != 0;
          any = any || mk_;
          all = all && mk_;
        }
        o[kb] = (uint8_t)((o[kb] & 2) & (all ? 2 : 0)) | (uint8_t)((o[kb] & 1) | (any ? 1 : 0));
      }
    }
  }
}

struct Plan {
  const Args* a;
  int64_t bq, bk, nq, nk;
  const uint8_t* exsum;  // null without an explicit mask
};

// Kind of the tile (query block qb of the G heads of kv head n2, key block kb) of batch b.
static inline int tile_kind(const Plan& P, int64_t b, int64_t n2, int64_t qb, int64_t kb) {
  const Args& a = *P.a;
  const int64_t i0 = qb * P.bq, i1 = std::min(i0 + P.bq, a.Sq);
  const int64_t j0 = kb * P.bk, j1 = std::min(j0 + P.bk, a.Skv);
  int kind = band_kind(a, b, i0, i1, j0, j1);
  if (kind == T_EMPTY || !P.exsum) return kind;
  const int64_t bm = a.Bm > 1 ? b : 0;
  bool any = false, all = true;
  const int64_t ng = a.Nm > 1 ? a.G : 1;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t nm = a.Nm > 1 ? n2 * a.G + g : 0;
    const uint8_t s = P.exsum[((bm * a.Nm + nm) * P.nq + qb) * P.nk + kb];
    any = any || (s & 1);
    all = all && (s & 2);
  }
  if (all) return T_EMPTY;
  if (any) return T_PARTIAL;
  return kind;
}

// ------------------------------------------------------------------------------------------
// Position bias of one row: out[c] = bias(i, j0 + c) for c < nc, zero on [nc, ncp).
// ------------------------------------------------------------------------------------------
static void bias_row(const Args& a, int64_t b, int64_t n1, int64_t i, int64_t j0, int64_t nc, int64_t ncp,
                     float* out) {
  const int64_t* s = a.pse.s;
  if (a.pse_kind == PSE_DENSE) {
    const int64_t bp = a.Bp > 1 ? b : 0, ii = a.Sp > 1 ? i : 0;
    load_row(out, a.pse.p, a.pse.dtype, bp * s[0] + n1 * s[1] + ii * s[2] + j0 * s[3], s[3], nc, ncp);
    return;
  }
  if (a.pse_kind == PSE_COMP || a.pse_kind == PSE_COMP_TND) {
    const int64_t bp = a.Bp > 1 ? b : 0, W = a.W;
    int64_t row, coff;
    if (a.pse_kind == PSE_COMP_TND) {
      row = 1023;
      coff = (W - 1) - i;
    } else {
      const int64_t thr = a.csq - 1024;
      if (i >= thr) {
        row = i - thr;
        coff = 0;
      } else {
        row = i % 1024;
        coff = W - 1024 + row - i;
      }
    }
    const int64_t base = bp * s[0] + n1 * s[1] + row * s[2];
    const int64_t first = j0 + coff;  // stored column of c = 0
    const int64_t cl = clampi(-first, 0, nc), ch = clampi(W - first, cl, nc);
    const float left = at_f(a.pse.p, a.pse.dtype, base), right = at_f(a.pse.p, a.pse.dtype, base + (W - 1) * s[3]);
    for (int64_t c = 0; c < cl; ++c) out[c] = left;
    load_span(out + cl, a.pse.p, a.pse.dtype, base + (first + cl) * s[3], s[3], ch - cl);
    for (int64_t c = ch; c < nc; ++c) out[c] = right;
    for (int64_t c = nc; c < ncp; ++c) out[c] = 0.f;
    return;
  }
  // In-kernel ALiBi: -slope * |(j + ak) - (i + aq)| (or its square root).
  const int64_t bs = a.Bs > 1 ? b : 0;
  const float ns = -a.slopes[bs * a.sl_s0 + n1 * a.sl_s1];
  const int64_t base = (j0 + a.ak) - (i + a.aq);
  const vf vns = vset1(ns);
  if (base > -(int64_t)2000000000 && base + ncp < (int64_t)2000000000) {
    for (int64_t c = 0; c < ncp; c += 8) {
      vf d = vabs_iota(base + c);
      if (a.asqrt) d = vsqrt(d);
      vst(out + c, vmul(vns, d));
    }
  } else {
    for (int64_t c = 0; c < ncp; ++c) {
      const int64_t x = base + c;
      float d = (float)(x < 0 ? -x : x);
      if (a.asqrt) d = std::sqrt(d);
      out[c] = ns * d;
    }
  }
  for (int64_t c = nc; c < ncp; ++c) out[c] = 0.f;
}

// dpse += g for one row (the transpose of bias_row's gather; no races: see callers).
static void dpse_row(const Args& a, int64_t b, int64_t n1, int64_t i, int64_t j0, int64_t nc, const float* g) {
  const int64_t* s = a.dpse_s;
  const int64_t bp = a.dpB > 1 ? b : 0;
  if (a.pse_kind == PSE_DENSE) {
    const int64_t ii = a.Sp > 1 ? i : 0;
    float* p = a.dpse + bp * s[0] + n1 * s[1] + ii * s[2] + j0 * s[3];
    if (s[3] == 1) {
      int64_t c = 0;
      for (; c + 8 <= nc; c += 8) vst(p + c, vadd(vld(p + c), vld(g + c)));
      for (; c < nc; ++c) p[c] += g[c];
    } else {
      for (int64_t c = 0; c < nc; ++c) p[c * s[3]] += g[c];
    }
    return;
  }
  const int64_t W = a.W;
  int64_t row, coff;
  if (a.pse_kind == PSE_COMP_TND) {
    row = 1023;
    coff = (W - 1) - i;
  } else {
    const int64_t thr = a.csq - 1024;
    if (i >= thr) {
      row = i - thr;
      coff = 0;
    } else {
      row = i % 1024;
      coff = W - 1024 + row - i;
    }
  }
  float* p = a.dpse + bp * s[0] + n1 * s[1] + row * s[2];
  for (int64_t c = 0; c < nc; ++c) p[clampi(j0 + c + coff, 0, W - 1) * s[3]] += g[c];
}

// ------------------------------------------------------------------------------------------
// Dropout keep bytes of one row: keep[c] = 1 if element (b, n1, i, j0 + c) is kept; 0 on [nc, ncp).
// ------------------------------------------------------------------------------------------
static void keep_row(const Args& a, int64_t b, int64_t n1, int64_t i, int64_t j0, int64_t nc, int64_t ncp,
                     uint8_t* keep, uint8_t* bytes) {
  const int64_t e0 = a.dbase[b] + (n1 * a.dsq + i) * a.drow + j0;
  if (a.drop == DROP_BITS) {
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t f = e0 + c;
      keep[c] = (uint8_t)((a.bits[f >> 3] >> (f & 7)) & 1);
    }
  } else {
    // Counters cbase + e / 16 for e in [e0, e0 + nc); 16 bytes (elements) per counter.
    const int64_t f0 = e0 >> 4, f1 = (e0 + nc - 1) >> 4, nctr = f1 - f0 + 1;
    uint32_t lo[8], hi[8], w[4][8];
    for (int64_t q = 0; q < nctr; q += 8) {
      for (int t = 0; t < 8; ++t) {
        const uint64_t c = a.cbase + (uint64_t)(f0 + q + t);
        lo[t] = (uint32_t)c;
        hi[t] = (uint32_t)(c >> 32);
      }
      philox8(lo, hi, a.key0, a.key1, kRounds, w);
      uint32_t* dst = reinterpret_cast<uint32_t*>(bytes + 16 * q);
      for (int t = 0; t < 8; ++t)
        for (int x = 0; x < 4; ++x) dst[4 * t + x] = w[x][t];  // little-endian words: bytes in order
    }
    const uint8_t* src = bytes + (e0 & 15);
    int64_t c = 0;
    for (; c + 32 <= nc; c += 32) vkeep32(src + c, a.thresh, keep + c);
    for (; c < nc; ++c) keep[c] = src[c] <= a.thresh ? 1 : 0;
  }
  for (int64_t c = nc; c < ncp; ++c) keep[c] = 0;
}

// ------------------------------------------------------------------------------------------
// Logits of one row in place: L = S * scale (+ bias), -inf where (i, j) does not take part and on
// the padding [nc, ncp). Returns max over the row (NaN if a logit is NaN).
// ------------------------------------------------------------------------------------------
// BWD: store P = exp(L - m) * il instead, exactly 0 where (i, j) does not take part and on the
// padding (as the reference's where(allowed, ..., 0)), and return 0.
template <bool BWD>
static inline __attribute__((always_inline)) float logits_row(const Args& a, float* srow, int64_t b, int64_t n1, int64_t i, int64_t j0, int64_t nc,
                        int64_t ncp, bool partial, float* bias, float m = 0.f, float il = 0.f) {
  const bool hasb = a.pse_kind != PSE_NONE;
  if (hasb) bias_row(a, b, n1, i, j0, nc, ncp, bias);
  const vf vs = vset1(a.scale), ninf = vset1(kNegInf);
  int64_t blo = 0, bhi = 0, phi = 0;
  const uint8_t* exr = nullptr;
  int64_t est = 0;
  if (partial) {
    blo = clampi(i + a.lo - j0, 0, nc);
    bhi = clampi(i + a.hi + 1 - j0, 0, nc);
    if (bhi < blo) bhi = blo;
    if (a.prefix) phi = clampi(a.prefix[b] - j0, 0, nc);
    if (a.ex) {
      const int64_t bm = a.Bm > 1 ? b : 0, nm = a.Nm > 1 ? n1 : 0;
      est = a.ex_s[3];
      exr = a.ex + bm * a.ex_s[0] + nm * a.ex_s[1] + i * a.ex_s[2] + j0 * est;
    }
  }
  vf vm = ninf, vnan = vzero();
  const vf vmr = vset1(m), vil = vset1(il);
  for (int64_t c = 0; c < ncp; c += 8) {
    vf x = vld(srow + c);
    if (hasb) {
      vf bb = vld(bias + c);
      x = a.pse_pre ? vmul(vadd(x, bb), vs) : vadd(vmul(x, vs), bb);
    } else {
      x = vmul(x, vs);
    }
    if (partial) {
      vf allow = vrange(c, blo, bhi);
      if (a.prefix) allow = vor(allow, vrange(c, 0, phi));
      if (exr) {
        if (est == 1 && c + 8 <= nc) {
          allow = vand(allow, vbytes_zero(exr + c));
        } else {
          uint8_t tmp[8] = {1, 1, 1, 1, 1, 1, 1, 1};
          for (int64_t t = 0; t < 8 && c + t < nc; ++t) tmp[t] = exr[(c + t) * est];
          allow = vand(allow, vbytes_zero(tmp));
        }
      }
      if (BWD) {
        if (c + 8 > nc) allow = vand(allow, vrange(c, 0, nc));
        vst(srow + c, vand(vmul(vexp(vsub(x, vmr)), vil), allow));
        continue;
      }
      x = vblend(ninf, x, allow);
    }
    if (BWD) {
      vf p = vmul(vexp(vsub(x, vmr)), vil);
      if (c + 8 > nc) p = vand(p, vrange(c, 0, nc));
      vst(srow + c, p);
      continue;
    }
    if (c + 8 > nc) x = vblend(ninf, x, vrange(c, 0, nc));
    vst(srow + c, x);
    vm = vmax(vm, x);
    vnan = vor(vnan, visnan(x));
  }
  if (BWD) return 0.f;
  // A NaN logit makes the row's max NaN, as torch.amax does in the reference.
  return vany(vnan) ? std::numeric_limits<float>::quiet_NaN() : vhmax(vm);
}

static inline vf keep_mask8(const uint8_t* keep) { return vbytes_nonzero(keep); }

// ------------------------------------------------------------------------------------------
// Scratch
// ------------------------------------------------------------------------------------------
static std::atomic<int> g_alloc_failed{0};

// Per-thread scratch kept between calls (grow only): no allocation, no page faults per call.
// Every buffer is fully written before it is read within a work item, so reuse cannot change results.
struct ThreadScratch {
  char* p = nullptr;
  size_t cap = 0;
  ~ThreadScratch() { std::free(p); }
};
static thread_local ThreadScratch t_scratch;

// Bump allocator over the thread's scratch. With base == nullptr it only measures.
struct Arena {
  char* base = nullptr;
  size_t used = 0;
  bool init(size_t bytes) {
    used = 0;
    bytes += 64;
    if (t_scratch.cap < bytes) {
      std::free(t_scratch.p);
      t_scratch.p = static_cast<char*>(std::malloc(bytes));
      t_scratch.cap = t_scratch.p ? bytes : 0;
    }
    base = t_scratch.p;
    if (!base) g_alloc_failed.store(1);
    return base != nullptr;
  }
  template <typename T>
  T* take(int64_t n) {
    size_t off = (used + 63) & ~(size_t)63;
    used = off + (size_t)n * sizeof(T) + 64;
    return base ? reinterpret_cast<T*>(base + off) : nullptr;
  }
};

// Threads worth starting for `macs` multiply-adds: small problems run on one thread (a fork/join
// costs more than it saves, and far more when the other cores are busy). Any count gives the
// same bits.
static int64_t threads_for(const Args& a, double macs, int64_t items) {
  int64_t t = a.min_macs > 0 ? (int64_t)(macs / a.min_macs) : a.nthreads;
  return std::max<int64_t>(1, std::min(std::min(a.nthreads, items), t));
}

// A pass over n independent items split into ranges by at::parallel_for, or one range when small.
static void run_static(const Args& a, double work, int64_t n, void* ctx, BodyFn body) {
  if (threads_for(a, work, n) > 1)
    a.parallel(n, ctx, body);
  else
    body(ctx, 0, n);
}

struct Work {
  std::atomic<int64_t> next{0};
  int64_t n = 0;
};

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
static const int64_t kSmallM = 4;  // at most this many rows: logits by dot products, no packing

struct Fwd {
  const Args* a;
  Plan plan;
  Work work;
  int64_t bkp;
};

struct FwdBuf {
  float *q, *s, *o, *kt, *kr, *vr, *m, *l, *alpha, *bias;
  uint8_t *keep, *bytes;
};

static void fwd_layout(const Args& a, int64_t bkp, Arena& ar, FwdBuf& w) {
  const int64_t M = a.G * a.bq;
  w.q = ar.take<float>(M * a.Dp);
  w.s = ar.take<float>(M * bkp);
  w.o = ar.take<float>(M * a.Dvp);
  w.m = ar.take<float>(M);
  w.l = ar.take<float>(M);
  w.alpha = ar.take<float>(M);
  w.kt = ar.take<float>(bkp * a.D);
  w.kr = ar.take<float>(bkp * a.Dp);
  w.vr = ar.take<float>(bkp * a.Dvp);
  w.bias = ar.take<float>(bkp);
  w.keep = ar.take<uint8_t>(bkp + 64);
  w.bytes = ar.take<uint8_t>(bkp + 160);
}
static size_t fwd_scratch_bytes(const Args& a, int64_t bkp) {
  Arena ar;
  FwdBuf w;
  fwd_layout(a, bkp, ar, w);
  return ar.used;
}

static void fwd_item(const Fwd& F, int64_t it, FwdBuf& w) {
  const Args& a = *F.a;
  const Plan& P = F.plan;
  const int64_t qb = it % P.nq, t = it / P.nq, n2 = t % a.N2, b = t / a.N2;
  const int64_t i0 = qb * P.bq, i1 = std::min(i0 + P.bq, a.Sq), nr = i1 - i0, M = a.G * nr;
  const int64_t Dp = a.Dp, Dvp = a.Dvp, bkp = F.bkp, D = a.D, Dv = a.Dv;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t n1 = n2 * a.G + r / nr, i = i0 + r % nr;
    load_row(w.q + r * Dp, a.q.p, a.q.dtype, b * a.q.s[0] + n1 * a.q.s[1] + i * a.q.s[2], a.q.s[3], D, Dp);
    w.m[r] = kNegInf;
    w.l[r] = 0.f;
    for (int64_t c = 0; c < Dvp; c += 8) vst(w.o + r * Dvp + c, vzero());
  }
  const bool k_f32 = a.k.dtype == DT_F32 && a.k.s[3] == 1;           // rows usable as they are
  const bool v_direct = a.v.s[3] == 1 && Dv % 8 == 0;                 // B operand read in place
  for (int64_t kb = 0; kb < P.nk; ++kb) {
    const int kind = tile_kind(P, b, n2, qb, kb);
    if (kind == T_EMPTY) continue;
    const int64_t j0 = kb * P.bk, nc = std::min(P.bk, a.Skv - j0), ncp = rup(nc, 16);
    // S = Q K^T
    const int64_t koff = b * a.k.s[0] + n2 * a.k.s[1] + j0 * a.k.s[2];
    if (M <= kSmallM) {  // dot products against float32 key rows
      const float* kr;
      int64_t krs;
      if (k_f32) {
        kr = static_cast<const float*>(a.k.p) + koff;
        krs = a.k.s[2];
      } else {
        for (int64_t c = 0; c < nc; ++c) load_row(w.kr + c * Dp, a.k.p, a.k.dtype, koff + c * a.k.s[2], a.k.s[3], D, Dp);
        kr = w.kr;
        krs = Dp;
      }
      sdot(M, nc, D, w.q, Dp, kr, krs, w.s, bkp);
    } else {  // packed K^T panels, converted from the keys' storage as they are packed
      pack_t(w.kt, a.k.p, a.k.dtype, koff, a.k.s[2], a.k.s[3], nc, D);
      gemm<false, false>(M, ncp, D, w.q, Dp, 1, w.kt, D * 16, 16, w.s, bkp, nullptr);
    }
    // Online softmax per row.
    for (int64_t r = 0; r < M; ++r) {
      const int64_t n1 = n2 * a.G + r / nr, i = i0 + r % nr;
      float* srow = w.s + r * bkp;
      const float mt = logits_row<false>(a, srow, b, n1, i, j0, nc, ncp, kind == T_PARTIAL, w.bias);
      const float mold = w.m[r];
      const float mnew = nanmax(mold, mt);
      const float muse = mnew == kNegInf ? 0.f : mnew;
      const float alpha = sexp(mold - muse);
      const vf vmu = vset1(muse);
      vf vsum = vzero();
      for (int64_t c = 0; c < ncp; c += 8) {
        vf p = vexp(vsub(vld(srow + c), vmu));
        vst(srow + c, p);
        vsum = vadd(vsum, p);
      }
      w.l[r] = w.l[r] * alpha + vhsum(vsum);
      w.m[r] = mnew;
      w.alpha[r] = alpha;
      if (a.drop != DROP_NONE) {
        keep_row(a, b, n1, i, j0, nc, ncp, w.keep, w.bytes);
        // P * Z as a product (a NaN P stays NaN where dropped, as P * Z does in the reference)
        const vf one = vset1(1.f);
        for (int64_t c = 0; c < ncp; c += 8) vst(srow + c, vmul(vld(srow + c), vand(one, keep_mask8(w.keep + c))));
      }
    }
    // O = alpha * O + P V (V rows read in place in their own dtype where the layout allows)
    const int64_t voff = b * a.v.s[0] + n2 * a.v.s[1] + j0 * a.v.s[2];
    if (v_direct) {
      gemm_dt<true, true>(a.v.dtype, M, Dvp, nc, w.s, bkp, 1, eptr(a.v.p, a.v.dtype, voff), 16, a.v.s[2], w.o, Dvp,
                          w.alpha);
    } else {
      for (int64_t c = 0; c < nc; ++c) load_row(w.vr + c * Dvp, a.v.p, a.v.dtype, voff + c * a.v.s[2], a.v.s[3], Dv, Dvp);
      gemm<true, true>(M, Dvp, nc, w.s, bkp, 1, w.vr, 16, Dvp, w.o, Dvp, w.alpha);
    }
  }
  // Finalise rows (SPEC 3 and 5: sink, invalid rows, dropout scale).
  const float inv_kp = a.drop != DROP_NONE ? 1.0f / a.keep_prob : 1.0f;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t n1 = n2 * a.G + r / nr, i = i0 + r % nr;
    const int64_t row = (b * a.N1 + n1) * a.Sq + i;
    float mm = w.m[r], ll = w.l[r], fa = 1.f;
    const bool valid = mm != kNegInf;
    if (a.sink) {
      const float sk = a.sink[n1];
      const float mf = nanmax(mm, sk);
      fa = sexp(mm - mf);
      ll = ll * fa + sexp(sk - mf);
      mm = mf;
    } else if (!valid) {
      mm = -kFltMax;
      ll = kFltMax;
    }
    float* orow = a.out + row * Dvp;
    const float* acc = w.o + r * Dvp;
    if (!valid) {
      for (int64_t c = 0; c < Dvp; c += 8) vst(orow + c, vzero());
    } else {
      const vf vfa = vset1(fa), vl = vset1(ll), vk = vset1(inv_kp);
      for (int64_t c = 0; c < Dvp; c += 8) {
        vf x = vld(acc + c);
        if (a.sink) x = vmul(x, vfa);
        x = vdiv(x, vl);
        if (a.drop != DROP_NONE) x = vmul(x, vk);
        vst(orow + c, x);
      }
    }
    a.mo[row] = mm;
    a.lso[row] = ll;
  }
}

static void fwd_body(void* ctx, int64_t begin, int64_t end) {
  Fwd& F = *static_cast<Fwd*>(ctx);
  const Args& a = *F.a;
  const int64_t bkp = F.bkp;
  for (int64_t t = begin; t < end; ++t) {
    Arena ar;
    if (!ar.init(fwd_scratch_bytes(a, bkp))) return;
    FwdBuf w;
    fwd_layout(a, bkp, ar, w);
    for (;;) {
      const int64_t it = F.work.next.fetch_add(1);
      if (it >= F.work.n) break;
      fwd_item(F, it, w);
    }
  }
}

static uint8_t* make_exsum(const Args& a, int64_t bq, int64_t bk, int64_t nq, int64_t nk) {
  if (!a.ex || nq == 0 || nk == 0) return nullptr;
  uint8_t* out = static_cast<uint8_t*>(std::malloc((size_t)(a.Bm * a.Nm * nq * nk)));
  if (!out) {
    g_alloc_failed.store(1);
    return nullptr;
  }
  ExSum e{&a, bq, bk, nq, nk, out};
  const double work = 4.0 * (double)a.Bm * a.Nm * a.Sq * a.Skv;
  run_static(a, work, a.Bm * a.Nm * nq, &e, exsum_body);
  return out;
}

// Returns 0 on success, 1 on allocation failure.
int forward(const Args& a) {
  g_alloc_failed.store(0);
  Fwd F;
  F.a = &a;
  F.plan.a = &a;
  F.plan.bq = a.bq;
  F.plan.bk = a.bk;
  F.plan.nq = (a.Sq + a.bq - 1) / a.bq;
  F.plan.nk = (a.Skv + a.bk - 1) / a.bk;
  F.bkp = rup(a.bk, 16);
  uint8_t* ex = make_exsum(a, a.bq, a.bk, F.plan.nq, F.plan.nk);
  if (a.ex && F.plan.nq && F.plan.nk && !ex) return 1;
  F.plan.exsum = ex;
  F.work.n = a.B * a.N2 * F.plan.nq;
  const double macs = (double)a.B * a.N1 * a.Sq * a.Skv * (a.D + a.Dv);
  if (F.work.n > 0) a.parallel(threads_for(a, macs, F.work.n), &F, fwd_body);
  std::free(ex);
  return g_alloc_failed.load();
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
struct RowPass {
  const Args* a;
};
// Per row: R = sum(dy * o), max, 1/sum (-0 marks invalid rows); per (b, n1): -sum p_sink * R.
static void rows_body(void* ctx, int64_t begin, int64_t end) {
  const Args& a = *static_cast<const RowPass*>(ctx)->a;
  const int64_t Dv = a.Dv, Dvp = a.Dvp;
  float* tmp = static_cast<float*>(std::malloc((size_t)(2 * Dvp + 16) * sizeof(float)));
  if (!tmp) {
    g_alloc_failed.store(1);
    return;
  }
  float* ty = tmp;
  float* to = tmp + Dvp;
  for (int64_t bn = begin; bn < end; ++bn) {
    const int64_t n1 = bn % a.N1, b = bn / a.N1;
    double acc = 0.0;
    for (int64_t i = 0; i < a.Sq; ++i) {
      load_row(ty, a.dy.p, a.dy.dtype, b * a.dy.s[0] + n1 * a.dy.s[1] + i * a.dy.s[2], a.dy.s[3], Dv, Dvp);
      load_row(to, a.o.p, a.o.dtype, b * a.o.s[0] + n1 * a.o.s[1] + i * a.o.s[2], a.o.s[3], Dv, Dvp);
      vf s = vzero();
      for (int64_t c = 0; c < Dvp; c += 8) s = vfma(vld(ty + c), vld(to + c), s);
      const float R = vhsum(s);
      const float mv = a.m[b * a.m_s[0] + n1 * a.m_s[1] + i * a.m_s[2]];
      const float lv = a.l[b * a.l_s[0] + n1 * a.l_s[1] + i * a.l_s[2]];
      const int64_t row = (b * a.N1 + n1) * a.Sq + i;
      const bool invalid = mv == -kFltMax;
      a.rrow[row] = R;
      a.mrow[row] = invalid ? 0.f : mv;
      a.ilrow[row] = invalid ? -0.0f : 1.0f / lv;  // -0: the invalid-row marker
      if (a.sink && !invalid) {
        const float ps = sexp(a.sink[n1] - mv) / lv;
        acc += -(double)(ps * R);
      }
    }
    if (a.dsink_part) a.dsink_part[bn] = acc;
  }
  std::free(tmp);
}

struct Bwd {
  const Args* a;
  Plan plan;
  Work work;
  int64_t bkp;
};

struct BwdBuf {
  float *q, *dy, *s, *pd, *dp, *kt, *vt, *kr, *vr, *bias;
  uint8_t *keep, *bytes;
};

static void bwd_layout(const Args& a, int64_t bkp, Arena& ar, BwdBuf& w) {
  const int64_t M = a.G * a.bq;
  w.q = ar.take<float>(M * a.Dp);
  w.dy = ar.take<float>(M * a.Dvp);
  w.s = ar.take<float>(M * bkp);
  w.pd = ar.take<float>(M * bkp);
  w.dp = ar.take<float>(M * bkp);
  w.kt = ar.take<float>(bkp * a.D);
  w.vt = ar.take<float>(bkp * a.Dv);
  w.kr = ar.take<float>(bkp * a.Dp);
  w.vr = ar.take<float>(bkp * a.Dvp);
  w.bias = ar.take<float>(bkp);
  w.keep = ar.take<uint8_t>(M * bkp);
  w.bytes = ar.take<uint8_t>(bkp + 160);
}
static size_t bwd_scratch_bytes(const Args& a, int64_t bkp) {
  Arena ar;
  BwdBuf w;
  bwd_layout(a, bkp, ar, w);
  return ar.used;
}

static void bwd_item(const Bwd& F, int64_t it, BwdBuf& w) {
  const Args& a = *F.a;
  const Plan& P = F.plan;
  const int64_t chunk = it % a.nchunk, n2 = (it / a.nchunk) % a.N2, b = it / (a.nchunk * a.N2);
  const int64_t kb0 = chunk * P.nk / a.nchunk, kb1 = (chunk + 1) * P.nk / a.nchunk;
  float* dq = chunk == 0 ? a.dq : a.dq_part + (chunk - 1) * (a.B * a.N1 * a.Sq * a.Dp);
  const int64_t Dp = a.Dp, Dvp = a.Dvp, bkp = F.bkp, D = a.D, Dv = a.Dv, G = a.G;
  // Every tile has at most kSmallM rows: S and dP by dot products (float32 rows), no packing.
  const bool small = G * std::min(P.bq, a.Sq) <= kSmallM;
  // K rows as the B operand of dQ += dS K, read in place (in their dtype) where the layout allows.
  const bool k_direct = a.k.s[3] == 1 && D % 8 == 0 && (!small || a.k.dtype == DT_F32);
  const bool v_f32 = a.v.dtype == DT_F32 && a.v.s[3] == 1;
  const bool drop = a.drop != DROP_NONE;
  const float zf = drop ? 1.0f / a.keep_prob : 1.0f;
  const vf vzf = vset1(zf), vsc = vset1(a.scale);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * P.bk, nc = std::min(P.bk, a.Skv - j0), ncp = rup(nc, 16);
    float* dkout = a.dk + ((b * a.N2 + n2) * a.Skv + j0) * Dp;
    float* dvout = a.dv + ((b * a.N2 + n2) * a.Skv + j0) * Dvp;
    bool any = false;
    for (int64_t qb = 0; qb < P.nq && !any; ++qb) any = tile_kind(P, b, n2, qb, kb) != T_EMPTY;
    if (!any) {
      std::memset(dkout, 0, sizeof(float) * nc * Dp);
      std::memset(dvout, 0, sizeof(float) * nc * Dvp);
      continue;
    }
    const int64_t koff = b * a.k.s[0] + n2 * a.k.s[1] + j0 * a.k.s[2];
    const void* kB;  // K rows [nc, D]: B operand of dQ (dtype kdt, row stride kld)
    int kdt;
    int64_t kld;
    if (k_direct) {
      kB = eptr(a.k.p, a.k.dtype, koff);
      kdt = a.k.dtype;
      kld = a.k.s[2];
    } else {
      for (int64_t c = 0; c < nc; ++c) load_row(w.kr + c * Dp, a.k.p, a.k.dtype, koff + c * a.k.s[2], a.k.s[3], D, Dp);
      kB = w.kr;
      kdt = DT_F32;
      kld = Dp;
    }
    const int64_t voff = b * a.v.s[0] + n2 * a.v.s[1] + j0 * a.v.s[2];
    const float* vr = nullptr;  // float32 V rows for the dot products of small tiles
    int64_t vrs = 0;
    if (small) {
      if (v_f32) {
        vr = static_cast<const float*>(a.v.p) + voff;
        vrs = a.v.s[2];
      } else {
        for (int64_t c = 0; c < nc; ++c) load_row(w.vr + c * Dvp, a.v.p, a.v.dtype, voff + c * a.v.s[2], a.v.s[3], Dv, Dvp);
        vr = w.vr;
        vrs = Dvp;
      }
    } else {  // packed K^T and V^T panels, converted from the operands' storage
      pack_t(w.kt, a.k.p, a.k.dtype, koff, a.k.s[2], a.k.s[3], nc, D);
      pack_t(w.vt, a.v.p, a.v.dtype, voff, a.v.s[2], a.v.s[3], nc, Dv);
    }
    const float* kr32 = static_cast<const float*>(kB);  // (small tiles: float32 rows, see k_direct)
    // dK / dV of this key block accumulate in place in the (padded, float32) outputs; the first
    // query block that takes part writes them (any was checked above: there is one).
    float* dka = dkout;
    float* dva = dvout;
    bool first = true;
    for (int64_t qb = 0; qb < P.nq; ++qb) {
      const int kind = tile_kind(P, b, n2, qb, kb);
      if (kind == T_EMPTY) continue;
      const int64_t i0 = qb * P.bq, i1 = std::min(i0 + P.bq, a.Sq), nr = i1 - i0, M = G * nr;
      for (int64_t r = 0; r < M; ++r) {
        const int64_t n1 = n2 * G + r / nr, i = i0 + r % nr;
        load_row(w.q + r * Dp, a.q.p, a.q.dtype, b * a.q.s[0] + n1 * a.q.s[1] + i * a.q.s[2], a.q.s[3], D, Dp);
        load_row(w.dy + r * Dvp, a.dy.p, a.dy.dtype, b * a.dy.s[0] + n1 * a.dy.s[1] + i * a.dy.s[2], a.dy.s[3], Dv, Dvp);
      }
      // P = exp(L - max) / sum
      if (small)
        sdot(M, nc, D, w.q, Dp, kr32, kld, w.s, bkp);
      else
        gemm<false, false>(M, ncp, D, w.q, Dp, 1, w.kt, D * 16, 16, w.s, bkp, nullptr);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t n1 = n2 * G + r / nr, i = i0 + r % nr;
        const int64_t row = (b * a.N1 + n1) * a.Sq + i;
        float* srow = w.s + r * bkp;
        float* pdrow = w.pd + r * bkp;
        const float il = a.ilrow[row];
        if (il == 0.f && std::signbit(il)) {  // invalid row: no gradient
          for (int64_t c = 0; c < ncp; c += 8) vst(srow + c, vzero());
          if (drop) {
            for (int64_t c = 0; c < ncp; c += 8) vst(pdrow + c, vzero());
            std::memset(w.keep + r * bkp, 0, (size_t)ncp);
          }
          continue;
        }
        logits_row<true>(a, srow, b, n1, i, j0, nc, ncp, kind == T_PARTIAL, w.bias, a.mrow[row], il);
        if (drop) {
          uint8_t* kp = w.keep + r * bkp;
          keep_row(a, b, n1, i, j0, nc, ncp, kp, w.bytes);
          for (int64_t c = 0; c < ncp; c += 8)
            vst(pdrow + c, vmul(vld(srow + c), vand(vzf, keep_mask8(kp + c))));
        }
      }
      const float* pd = drop ? w.pd : w.s;
      // dV += Pd^T dY
      if (first)
        gemm<false, false>(nc, Dvp, M, pd, 1, bkp, w.dy, 16, Dvp, dva, Dvp, nullptr);
      else
        gemm<true, false>(nc, Dvp, M, pd, 1, bkp, w.dy, 16, Dvp, dva, Dvp, nullptr);
      // dP = dY V^T
      if (small)
        sdot(M, nc, Dv, w.dy, Dvp, vr, vrs, w.dp, bkp);
      else
        gemm<false, false>(M, ncp, Dv, w.dy, Dvp, 1, w.vt, Dv * 16, 16, w.dp, bkp, nullptr);
      // dS = P * (dP * Z / keep_prob - R); the scaled dS goes into dp.
      for (int64_t r = 0; r < M; ++r) {
        const int64_t n1 = n2 * G + r / nr, i = i0 + r % nr;
        const int64_t row = (b * a.N1 + n1) * a.Sq + i;
        float* srow = w.s + r * bkp;
        float* dprow = w.dp + r * bkp;
        const vf vr_ = vset1(a.rrow[row]);
        const uint8_t* kp = w.keep + r * bkp;
        float* graw = w.bias;  // bias buffer is free here: the unscaled dS row for dpse
        const bool need_raw = a.dpse && !a.pse_pre;
        for (int64_t c = 0; c < ncp; c += 8) {
          vf dpv = vld(dprow + c);
          if (drop) dpv = vmul(dpv, vand(vzf, keep_mask8(kp + c)));
          vf ds = vmul(vld(srow + c), vsub(dpv, vr_));
          if (need_raw) vst(graw + c, ds);
          vst(dprow + c, vmul(ds, vsc));
        }
        if (a.dpse) dpse_row(a, b, n1, i, j0, nc, a.pse_pre ? dprow : graw);
      }
      // dQ += dS K (per head: dQ rows of different heads are not equally spaced)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n1 = n2 * G + g;
        float* dqrow = dq + ((b * a.N1 + n1) * a.Sq + i0) * Dp;
        gemm_dt<true, false>(kdt, nr, Dp, nc, w.dp + g * nr * bkp, bkp, 1, kB, 16, kld, dqrow, Dp, nullptr);
      }
      // dK += dS^T Q
      if (first)
        gemm<false, false>(nc, Dp, M, w.dp, 1, bkp, w.q, 16, Dp, dka, Dp, nullptr);
      else
        gemm<true, false>(nc, Dp, M, w.dp, 1, bkp, w.q, 16, Dp, dka, Dp, nullptr);
      first = false;
    }
  }
}

static void bwd_body(void* ctx, int64_t begin, int64_t end) {
  Bwd& F = *static_cast<Bwd*>(ctx);
  const Args& a = *F.a;
  const int64_t bkp = F.bkp;
  for (int64_t t = begin; t < end; ++t) {
    Arena ar;
    if (!ar.init(bwd_scratch_bytes(a, bkp))) return;
    BwdBuf w;
    bwd_layout(a, bkp, ar, w);
    for (;;) {
      const int64_t it = F.work.next.fetch_add(1);
      if (it >= F.work.n) break;
      bwd_item(F, it, w);
    }
  }
}

struct DqSum {
  const Args* a;
};
static void dqsum_body(void* ctx, int64_t begin, int64_t end) {
  const Args& a = *static_cast<const DqSum*>(ctx)->a;
  const int64_t Dp = a.Dp, stride = a.B * a.N1 * a.Sq * Dp;
  for (int64_t r = begin; r < end; ++r) {
    float* d = a.dq + r * Dp;
    for (int64_t c = 0; c < Dp; c += 8) {
      vf x = vld(d + c);
      for (int64_t p = 0; p + 1 < a.nchunk; ++p) x = vadd(x, vld(a.dq_part + p * stride + r * Dp + c));
      vst(d + c, x);
    }
  }
}

int backward(const Args& a) {
  g_alloc_failed.store(0);
  RowPass rp{&a};
  const double row_work = 64.0 * (double)a.B * a.N1 * a.Sq * a.Dv;  // as macs: it is memory bound
  if (a.B * a.N1 > 0) run_static(a, row_work, a.B * a.N1, &rp, rows_body);
  if (g_alloc_failed.load()) return 1;
  Bwd F;
  F.a = &a;
  F.plan.a = &a;
  F.plan.bq = a.bq;
  F.plan.bk = a.bk;
  F.plan.nq = (a.Sq + a.bq - 1) / a.bq;
  F.plan.nk = (a.Skv + a.bk - 1) / a.bk;
  F.bkp = rup(a.bk, 16);
  uint8_t* ex = make_exsum(a, a.bq, a.bk, F.plan.nq, F.plan.nk);
  if (a.ex && F.plan.nq && F.plan.nk && !ex) return 1;
  F.plan.exsum = ex;
  F.work.n = a.B * a.N2 * a.nchunk;
  const double macs = 2.5 * (double)a.B * a.N1 * a.Sq * a.Skv * (a.D + a.Dv);
  if (F.work.n > 0 && F.plan.nk > 0) a.parallel(threads_for(a, macs, F.work.n), &F, bwd_body);
  std::free(ex);
  if (a.nchunk > 1 && !g_alloc_failed.load()) {  // dq += partials, in chunk order
    DqSum s{&a};
    const int64_t rows = a.B * a.N1 * a.Sq;
    run_static(a, 4.0 * rows * a.Dp * (a.nchunk - 1), rows, &s, dqsum_body);
  }
  return g_alloc_failed.load();
}

const char* isa_name() { return FASCORE_ISA_NAME; }

// Per-thread scratch bytes of a pass (for workspace estimates).
int64_t scratch_bytes(const Args& a, bool bwd) {
  const int64_t bkp = rup(a.bk, 16);
  return (int64_t)(bwd ? bwd_scratch_bytes(a, bkp) : fwd_scratch_bytes(a, bkp));
}

// Plain-data description of one attention pass, shared by the ATen front end (native.cpp) and
// the ISA-specific kernel translation units (kernels_*.cpp), which include no torch headers.
#pragma once
#include <cstdint>

namespace fascore_native {

enum DType { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum PseKind { PSE_NONE = 0, PSE_DENSE = 1, PSE_COMP = 2, PSE_COMP_TND = 3, PSE_ALIBI = 4 };
enum DropKind { DROP_NONE = 0, DROP_PHILOX = 1, DROP_BITS = 2 };

// A [d0, d1, d2, d3] view: element (a, b, c, d) at p + a*s[0] + b*s[1] + c*s[2] + d*s[3]
// (strides in elements of ``dtype``).
struct View {
  const void* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  int dtype = DT_F32;
};

// Runs body(ctx, begin, end) over [0, n) on the intra-op thread pool.
typedef void (*BodyFn)(void* ctx, int64_t begin, int64_t end);
typedef void (*ParallelFn)(int64_t n, void* ctx, BodyFn body);

struct Args {
  // Geometry of the segment.
  int64_t B = 0, N1 = 0, N2 = 0, G = 1, Sq = 0, Skv = 0, D = 0, Dv = 0;
  View q, k, v;  // [B, N1, Sq, D], [B, N2, Skv, D], [B, N2, Skv, Dv]
  float scale = 1.f;

  // Mask: (i, j) takes part iff (lo <= j - i <= hi or j < prefix[b]) and not ex[b?, n?, i, j].
  int64_t lo = 0, hi = 0;
  const int64_t* prefix = nullptr;  // [B] or null
  const uint8_t* ex = nullptr;      // nonzero = masked out
  int64_t ex_s[4] = {0, 0, 0, 0};
  int64_t Bm = 1, Nm = 1;

  // Position bias.
  int pse_kind = PSE_NONE;
  int pse_pre = 0;        // 1: L = (S + pse) * scale; 0: L = S * scale + pse
  View pse;               // dense [Bp, N1, Sp, Skv] or compressed [Bp, N1, 1024, W]
  int64_t Bp = 1, Sp = 1, W = 0, csq = 0;  // csq: the compressed form's Sq
  const float* slopes = nullptr;           // ALiBi [Bs, N1]
  int64_t sl_s0 = 0, sl_s1 = 1, Bs = 1;
  int64_t aq = 0, ak = 0;  // q_start_idx, kv_start_idx
  int asqrt = 0;

  const float* sink = nullptr;  // [N1] or null

  // Dropout: element (b, n, i, j) is number dbase[b] + (n * dsq + i) * drow + j.
  int drop = DROP_NONE;
  float keep_prob = 1.f;
  const int64_t* dbase = nullptr;
  int64_t drow = 0, dsq = 0;
  uint64_t cbase = 0;  // Philox counter of element 0
  uint32_t key0 = 0, key1 = 0;
  int thresh = 255;    // keep iff byte <= thresh
  const uint8_t* bits = nullptr;  // explicit mask bytes
  int64_t nbytes = 0;

  // Tiles: query rows per head and keys per tile.
  int64_t bq = 64, bk = 128;

  // Forward outputs (float32, contiguous): out [B, N1, Sq, Dvp], mo / lo_ [B, N1, Sq].
  int64_t Dp = 0, Dvp = 0;  // D and Dv rounded up to a multiple of 8
  float* out = nullptr;
  float* mo = nullptr;
  float* lso = nullptr;

  // Backward inputs.
  View dy, o;                        // [B, N1, Sq, Dv]
  const float* m = nullptr;          // [B, N1, Sq] with strides m_s
  int64_t m_s[3] = {0, 0, 0};
  const float* l = nullptr;
  int64_t l_s[3] = {0, 0, 0};
  // Backward outputs: dq [B, N1, Sq, Dp], dk [B, N2, Skv, Dp], dv [B, N2, Skv, Dvp] (float32).
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  float* dpse = nullptr;  // [dpB, N1, ., .] float32 with strides dpse_s
  int64_t dpse_s[4] = {0, 0, 0, 0};
  int64_t dpB = 1;
  double* dsink_part = nullptr;  // [B, N1]: -sum_i p_sink * R per (b, n1)
  // Scratch rows [B, N1, Sq]: R = rowsum(dy * o), the row max and 1 / sum (0 on invalid rows).
  float* rrow = nullptr;
  float* mrow = nullptr;
  float* ilrow = nullptr;
  // Key chunks per (b, kv head) in the backward (bwd_chunks) and the dQ partials of chunks 1.. :
  // [nchunk - 1, B, N1, Sq, Dp], zeroed, summed into dq in chunk order after the pass.
  int64_t nchunk = 1;
  float* dq_part = nullptr;

  ParallelFn parallel = nullptr;
  int64_t nthreads = 1;
  double min_macs = 16.0e6;  // start one more thread per this many multiply-adds (0: all threads)
};

// Backward work items are (b, kv head, key chunk). Few (b, kv head) pairs would leave threads
// idle, so each head's key blocks are split into chunks, chosen from the shape only (never from
// the thread count: the bits do not depend on it). Chunks > 0 accumulate dQ in their own buffer.
// A compressed pse's gradient entries are shared by many key blocks: no split then.
static inline int64_t bwd_chunks(int64_t B, int64_t N1, int64_t N2, int64_t Sq, int64_t Skv, int64_t bk, int64_t Dp,
                                 bool shared_dpse) {
  const int64_t pairs = B * N2, nk = bk > 0 ? (Skv + bk - 1) / bk : 0;
  if (shared_dpse || pairs <= 0 || nk <= 1) return 1;
  const int64_t target = 32;  // work items wanted
  int64_t c = (target + pairs - 1) / pairs;
  c = c < nk ? c : nk;
  const double part = 4.0 * (double)B * N1 * Sq * Dp;  // bytes of one dQ partial
  const double cap = 256.0 * 1024 * 1024;
  while (c > 1 && (c - 1) * part > cap) --c;
  return c < 1 ? 1 : c;
}

}  // namespace fascore_native

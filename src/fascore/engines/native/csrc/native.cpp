// ATen front end of the native engine: checks shapes, fills the plain Args, allocates the
// float32 outputs and runs one kernel pass on the intra-op thread pool (at::parallel_for).
// Registered as torch operators (TORCH_LIBRARY, no pybind: light headers, short build) in the
// namespace TORCH_EXTENSION_NAME, one per build.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "args.h"

namespace fascore_native {
namespace avx2 {
bool supported();
int forward(const Args&);
int backward(const Args&);
const char* isa_name();
int64_t scratch_bytes(const Args&, bool);
}  // namespace avx2
namespace generic {
int forward(const Args&);
int backward(const Args&);
const char* isa_name();
int64_t scratch_bytes(const Args&, bool);
}  // namespace generic
}  // namespace fascore_native

using fascore_native::Args;
using fascore_native::View;
using OptT = std::optional<at::Tensor>;

namespace {

int g_isa = -1;  // 0 generic, 1 avx2; decided from the CPU on first use
double g_min_macs = 16.0e6;  // work per extra thread (multiply-adds); 0 starts every thread

int isa() {
  if (g_isa < 0) g_isa = fascore_native::avx2::supported() ? 1 : 0;
  return g_isa;
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fascore_native::DT_F32;
    case at::kHalf: return fascore_native::DT_F16;
    case at::kBFloat16: return fascore_native::DT_BF16;
    default: TORCH_CHECK(false, "fascore native engine: dtype ", t, " is not supported (float32, float16, bfloat16)");
  }
  return 0;
}

View view4(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must have 4 dimensions, got ", t.dim());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  View v;
  v.p = t.data_ptr();
  for (int i = 0; i < 4; ++i) v.s[i] = t.size(i) == 1 ? 0 : t.stride(i);
  v.dtype = dtype_code(t.scalar_type());
  return v;
}

void run_parallel(int64_t n, void* ctx, fascore_native::BodyFn body) {
  if (n <= 0) return;
  if (n == 1) {
    body(ctx, 0, 1);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

int64_t r8(int64_t x) { return (x + 7) / 8 * 8; }

// Common part of both passes. ip / fp: see _adapter.py (iparams / fparams).
Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& ex, const OptT& pse,
               const OptT& slopes, const OptT& sink, const OptT& bits, const OptT& prefix, const OptT& dbase,
               const std::vector<int64_t>& ip, const std::vector<double>& fp) {
  TORCH_CHECK(ip.size() >= 17 && fp.size() >= 2, "fascore native engine: bad parameter vectors");
  Args a;
  a.q = view4(q, "q");
  a.k = view4(k, "k");
  a.v = view4(v, "v");
  a.B = q.size(0);
  a.N1 = q.size(1);
  a.Sq = q.size(2);
  a.D = q.size(3);
  a.N2 = k.size(1);
  a.Skv = k.size(2);
  a.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == a.B && v.size(0) == a.B && k.size(3) == a.D && v.size(1) == a.N2 && v.size(2) == a.Skv,
              "fascore native engine: q/k/v shapes disagree");
  TORCH_CHECK(a.N2 > 0 && a.N1 % a.N2 == 0, "fascore native engine: N1 must be a multiple of N2");
  a.G = a.N1 / a.N2;
  a.Dp = r8(a.D);
  a.Dvp = r8(a.Dv);
  a.scale = (float)fp[0];
  a.keep_prob = (float)fp[1];
  a.lo = ip[0];
  a.hi = ip[1];
  if (prefix) {
    TORCH_CHECK(prefix->scalar_type() == at::kLong && prefix->is_contiguous() && prefix->numel() >= a.B, "prefix");
    a.prefix = prefix->data_ptr<int64_t>();
  }
  if (ex) {
    const at::Tensor& e = *ex;
    TORCH_CHECK(e.dim() == 4 && (e.scalar_type() == at::kBool || e.scalar_type() == at::kByte),
                "explicit mask must be bool/uint8 [Bm, Nm, Sq, Skv]");
    TORCH_CHECK(e.size(2) == a.Sq && e.size(3) == a.Skv && (e.size(0) == 1 || e.size(0) == a.B) &&
                    (e.size(1) == 1 || e.size(1) == a.N1),
                "explicit mask shape");
    a.ex = static_cast<const uint8_t*>(e.data_ptr());
    for (int i = 0; i < 4; ++i) a.ex_s[i] = e.size(i) == 1 ? 0 : e.stride(i);
    a.Bm = e.size(0);
    a.Nm = e.size(1);
  }
  a.pse_kind = (int)ip[2];
  a.pse_pre = (int)ip[3];
  a.csq = ip[4];
  a.aq = ip[5];
  a.ak = ip[6];
  a.asqrt = (int)ip[7];
  if (a.pse_kind == fascore_native::PSE_DENSE || a.pse_kind == fascore_native::PSE_COMP ||
      a.pse_kind == fascore_native::PSE_COMP_TND) {
    TORCH_CHECK(pse.has_value(), "pse tensor missing");
    a.pse = view4(*pse, "pse");
    a.Bp = pse->size(0);
    a.Sp = pse->size(2);
    a.W = pse->size(3);
    TORCH_CHECK(pse->size(1) == a.N1 && (a.Bp == 1 || a.Bp == a.B), "pse shape");
    if (a.pse_kind == fascore_native::PSE_DENSE) {
      TORCH_CHECK((a.Sp == 1 || a.Sp == a.Sq) && a.W == a.Skv, "dense pse shape");
    } else {
      TORCH_CHECK(a.Sp == 1024, "compressed pse must have 1024 rows");
    }
  } else if (a.pse_kind == fascore_native::PSE_ALIBI) {
    TORCH_CHECK(slopes.has_value() && slopes->dim() == 2 && slopes->scalar_type() == at::kFloat, "slopes");
    TORCH_CHECK(slopes->size(1) == a.N1 && (slopes->size(0) == 1 || slopes->size(0) == a.B), "slopes shape");
    a.slopes = slopes->data_ptr<float>();
    a.Bs = slopes->size(0);
    a.sl_s0 = slopes->stride(0);
    a.sl_s1 = slopes->stride(1);
  }
  if (sink) {
    TORCH_CHECK(sink->scalar_type() == at::kFloat && sink->is_contiguous() && sink->numel() == a.N1, "sink");
    a.sink = sink->data_ptr<float>();
  }
  a.drop = (int)ip[8];
  if (a.drop != fascore_native::DROP_NONE) {
    TORCH_CHECK(dbase.has_value() && dbase->scalar_type() == at::kLong && dbase->is_contiguous() &&
                    dbase->numel() >= a.B,
                "dropout base");
    a.dbase = dbase->data_ptr<int64_t>();
    a.drow = ip[9];
    a.dsq = ip[10];
    a.cbase = (uint64_t)ip[11];
    a.key0 = (uint32_t)ip[12];
    a.key1 = (uint32_t)ip[13];
    a.thresh = (int)ip[14];
    if (a.drop == fascore_native::DROP_BITS) {
      TORCH_CHECK(bits.has_value() && bits->scalar_type() == at::kByte && bits->is_contiguous(), "dropout bits");
      a.bits = bits->data_ptr<uint8_t>();
      a.nbytes = bits->numel();
    }
  }
  a.bq = std::max<int64_t>(1, ip[15]);
  a.bk = std::max<int64_t>(1, ip[16]);
  a.parallel = run_parallel;
  a.nthreads = std::max<int64_t>(1, at::get_num_threads());
  a.min_macs = g_min_macs;
  return a;
}

int run(const Args& a, bool bwd) {
  if (isa() == 1) return bwd ? fascore_native::avx2::backward(a) : fascore_native::avx2::forward(a);
  return bwd ? fascore_native::generic::backward(a) : fascore_native::generic::forward(a);
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& ex,
                                const OptT& pse, const OptT& slopes, const OptT& sink, const OptT& bits,
                                const OptT& prefix, const OptT& dbase, c10::ArrayRef<int64_t> ipr,
                                c10::ArrayRef<double> fpr) {
  const std::vector<int64_t> ip(ipr.begin(), ipr.end());
  const std::vector<double> fp(fpr.begin(), fpr.end());
  Args a = make_args(q, k, v, ex, pse, slopes, sink, bits, prefix, dbase, ip, fp);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::empty({a.B, a.N1, a.Sq, a.Dvp}, f32);
  at::Tensor mo = at::empty({a.B, a.N1, a.Sq}, f32);
  at::Tensor lo = at::empty({a.B, a.N1, a.Sq}, f32);
  a.out = out.data_ptr<float>();
  a.mo = mo.data_ptr<float>();
  a.lso = lo.data_ptr<float>();
  TORCH_CHECK(run(a, false) == 0, "fascore native engine: out of memory for scratch buffers");
  return {out, mo, lo};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dy,
                                 const at::Tensor& o, const at::Tensor& m, const at::Tensor& l, const OptT& ex,
                                 const OptT& pse, const OptT& slopes, const OptT& sink, const OptT& bits,
                                 const OptT& prefix, const OptT& dbase, const OptT& dpse, const OptT& dsink,
                                 c10::ArrayRef<int64_t> ipr, c10::ArrayRef<double> fpr) {
  const std::vector<int64_t> ip(ipr.begin(), ipr.end());
  const std::vector<double> fp(fpr.begin(), fpr.end());
  Args a = make_args(q, k, v, ex, pse, slopes, sink, bits, prefix, dbase, ip, fp);
  a.dy = view4(dy, "dy");
  a.o = view4(o, "attention_in");
  TORCH_CHECK(dy.size(0) == a.B && dy.size(1) == a.N1 && dy.size(2) == a.Sq && dy.size(3) == a.Dv, "dy shape");
  TORCH_CHECK(o.sizes() == dy.sizes(), "attention_in shape");
  for (const at::Tensor* t : {&m, &l}) {
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->size(0) == a.B && t->size(1) == a.N1 &&
                    t->size(2) == a.Sq,
                "statistics must be float32 [B, N1, Sq]");
  }
  a.m = m.data_ptr<float>();
  a.l = l.data_ptr<float>();
  for (int i = 0; i < 3; ++i) {
    a.m_s[i] = m.stride(i);
    a.l_s[i] = l.stride(i);
  }
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dq = at::zeros({a.B, a.N1, a.Sq, a.Dp}, f32);
  at::Tensor dk = at::empty({a.B, a.N2, a.Skv, a.Dp}, f32);
  at::Tensor dvv = at::empty({a.B, a.N2, a.Skv, a.Dvp}, f32);
  a.dq = dq.data_ptr<float>();
  a.dk = dk.data_ptr<float>();
  a.dv = dvv.data_ptr<float>();
  const int64_t rows = a.B * a.N1 * a.Sq;
  at::Tensor rbuf = at::empty({3, std::max<int64_t>(rows, 1)}, f32);
  a.rrow = rbuf.data_ptr<float>();
  a.mrow = a.rrow + std::max<int64_t>(rows, 1);
  a.ilrow = a.mrow + std::max<int64_t>(rows, 1);
  at::Tensor dsp;
  if (dsink && a.sink) {
    TORCH_CHECK(dsink->scalar_type() == at::kFloat && dsink->is_contiguous() && dsink->numel() == a.N1, "dsink");
    dsp = at::zeros({a.B * a.N1}, at::TensorOptions().dtype(at::kDouble));
    a.dsink_part = dsp.data_ptr<double>();
  }
  at::Tensor tmp;
  if (dpse && a.pse_kind != fascore_native::PSE_NONE && a.pse_kind != fascore_native::PSE_ALIBI) {
    const at::Tensor& g = *dpse;
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.dim() == 4 && g.size(0) == a.Bp && g.size(1) == a.N1 &&
                    g.size(2) == a.Sp && g.size(3) == a.W,
                "dpse must be float32 shaped like pse");
    if (a.Bp == 1 && a.B > 1) {  // one partial per batch, summed in batch order below (no races)
      tmp = at::zeros({a.B, a.N1, a.Sp, a.W}, f32);
      a.dpse = tmp.data_ptr<float>();
      for (int i = 0; i < 4; ++i) a.dpse_s[i] = tmp.stride(i);
      a.dpB = a.B;
    } else {
      a.dpse = g.data_ptr<float>();
      for (int i = 0; i < 4; ++i) a.dpse_s[i] = g.size(i) == 1 ? 0 : g.stride(i);
      a.dpB = a.Bp;
    }
  }
  a.nchunk = fascore_native::bwd_chunks(a.B, a.N1, a.N2, a.Sq, a.Skv, a.bk, a.Dp,
                                       a.pse_kind == fascore_native::PSE_COMP ||
                                           a.pse_kind == fascore_native::PSE_COMP_TND);
  at::Tensor dq_part;
  if (a.nchunk > 1) {
    dq_part = at::zeros({a.nchunk - 1, a.B, a.N1, a.Sq, a.Dp}, f32);
    a.dq_part = dq_part.data_ptr<float>();
  }
  TORCH_CHECK(run(a, true) == 0, "fascore native engine: out of memory for scratch buffers");
  if (tmp.defined()) {
    const at::Tensor& g = *dpse;
    float* gp = g.data_ptr<float>();
    const float* tp = tmp.data_ptr<float>();
    const int64_t n1 = a.N1, x = a.Sp, y = a.W, per = n1 * x * y;
    const int64_t s1 = g.stride(1), s2 = g.stride(2), s3 = g.stride(3);
    const int64_t B = a.B;
    at::parallel_for(0, per, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t e = b0; e < b1; ++e) {
        const int64_t jj = e % y, ii = (e / y) % x, nn = e / (x * y);
        float acc = 0.f;
        for (int64_t bb = 0; bb < B; ++bb) acc += tp[bb * per + e];
        gp[nn * s1 + ii * s2 + jj * s3] += acc;
      }
    });
  }
  if (a.dsink_part) {
    float* ds = dsink->data_ptr<float>();
    const double* part = a.dsink_part;
    for (int64_t n = 0; n < a.N1; ++n) {
      double acc = 0.0;
      for (int64_t bb = 0; bb < a.B; ++bb) acc += part[bb * a.N1 + n];
      ds[n] += (float)acc;
    }
  }
  return {dq, dk, dvv};
}

std::string isa_name() {
  return isa() == 1 ? fascore_native::avx2::isa_name() : fascore_native::generic::isa_name();
}

void set_isa(std::string name) {
  if (name == "auto") {
    g_isa = -1;
  } else if (name == "avx2") {
    TORCH_CHECK(fascore_native::avx2::supported(), "this CPU lacks AVX2/FMA/F16C");
    g_isa = 1;
  } else if (name == "generic") {
    g_isa = 0;
  } else {
    TORCH_CHECK(false, "isa must be auto, avx2 or generic, got ", name);
  }
}

int64_t scratch_bytes(int64_t G, int64_t bq, int64_t bk, int64_t D, int64_t Dv, bool bwd) {
  Args a;
  a.G = G;
  a.bq = std::max<int64_t>(1, bq);
  a.bk = std::max<int64_t>(1, bk);
  a.D = D;
  a.Dv = Dv;
  a.Dp = r8(D);
  a.Dvp = r8(Dv);
  return isa() == 1 ? fascore_native::avx2::scratch_bytes(a, bwd) : fascore_native::generic::scratch_bytes(a, bwd);
}

}  // namespace

int64_t num_threads() { return at::get_num_threads(); }

// Key chunks of the backward for this shape (workspace estimates).
int64_t bwd_chunks(int64_t B, int64_t N1, int64_t N2, int64_t Sq, int64_t Skv, int64_t bk, int64_t D, bool shared_dpse) {
  return fascore_native::bwd_chunks(B, N1, N2, Sq, Skv, bk, r8(D), shared_dpse);
}

// Work (multiply-adds) per thread below which fewer threads start; 0: always all (tests).
double set_min_work(double macs) {
  const double old = g_min_macs;
  g_min_macs = macs < 0 ? 0 : macs;
  return old;
}

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? ex, Tensor? pse, Tensor? slopes, Tensor? sink, "
        "Tensor? bits, Tensor? prefix, Tensor? dbase, int[] ip, float[] fp) -> Tensor[]",
        &forward);
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor dy, Tensor o, Tensor m, Tensor l, Tensor? ex, Tensor? pse, "
        "Tensor? slopes, Tensor? sink, Tensor? bits, Tensor? prefix, Tensor? dbase, Tensor(a!)? dpse, Tensor(b!)? dsink, "
        "int[] ip, float[] fp) -> Tensor[]",
        &backward);
  m.def("isa() -> str", &isa_name);
  m.def("set_isa(str name) -> ()", &set_isa);
  m.def("scratch_bytes(int G, int bq, int bk, int D, int Dv, bool bwd) -> int", &scratch_bytes);
  m.def("num_threads() -> int", &num_threads);
  m.def("set_min_work(float macs) -> float", &set_min_work);
  m.def("bwd_chunks(int B, int N1, int N2, int Sq, int Skv, int bk, int D, bool shared_dpse) -> int", &bwd_chunks);
}

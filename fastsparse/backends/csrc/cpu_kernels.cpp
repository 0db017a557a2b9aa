// CPU kernels of the native backend: group statistics, coefficient rule, gradient, and the fused
// single-pass in-place gradient. OpenMP over work items (group, chunk); every reduction runs in
// a fixed order (per-lane partial sums, then lanes in order), so results do not depend on the
// thread count. Built just in time by fastsparse/backends/native.py; plain C ABI, no torch headers.
#include <math.h>

#include <cmath>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fastsparse_native.h"

namespace {


struct Bf16 { uint16_t bits; };
struct Half { uint16_t bits; };

// Loads convert to the accumulation type A; stores round to the storage type (fp16 and bf16
// through float, round to nearest even).
template <typename A> inline A load(const float* p) { return (A)*p; }
template <typename A> inline A load(const double* p) { return (A)*p; }
template <typename A> inline A load(const Half* p) { return (A)fs_half_to_float(p->bits); }
template <typename A> inline A load(const Bf16* p) { return (A)fs_bf16_to_float(p->bits); }

template <typename A> inline void store(float* p, A v) { *p = (float)v; }
template <typename A> inline void store(double* p, A v) { *p = (double)v; }
template <typename A> inline void store(Half* p, A v) { p->bits = fs_float_to_half((float)v); }
template <typename A> inline void store(Bf16* p, A v) { p->bits = fs_float_to_bf16((float)v); }

template <typename A> inline A sign_of(A x) { return (A)((x > 0) - (x < 0)); }

// Calls fn(pointer offset, count, stride) for each run of a group's elements [begin, end):
// runs follow the innermost (column) dimension.
template <typename Fn>
inline void for_each_run(const fs_segment& s, int64_t g, int64_t begin, int64_t end, Fn fn) {
  int64_t j = begin;
  while (j < end) {
    const int64_t r = j / s.cols, c = j % s.cols;
    const int64_t count = std::min(s.cols - c, end - j);
    fn(g * s.stride_group + r * s.stride_row + c * s.stride_col, count, s.stride_col);
    j += count;
  }
}

// Statistics of unit-stride runs use 32-byte vectors (GCC/Clang vector extensions; one AVX
// register) and kUnroll independent accumulators of each, so the loop is bound by memory, not by
// the latency of the additions. Wider generic vectors are split badly on AVX2, hence 32 bytes.
constexpr int kVectorBytes = 32;
constexpr int kUnroll = 4;

template <typename A> struct VectorOf;
template <> struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef uint32_t bits __attribute__((vector_size(kVectorBytes)));
  static constexpr uint32_t kAbsMask = 0x7fffffffu;
};
template <> struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef uint64_t bits __attribute__((vector_size(kVectorBytes)));
  static constexpr uint64_t kAbsMask = 0x7fffffffffffffffull;
};
template <typename A> using Vector = typename VectorOf<A>::type;
template <typename A> constexpr int kWidth = kVectorBytes / sizeof(A);
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

template <typename W, typename A> inline Vector<A> load_vector(const W* p) {
  Vector<A> x;
  if constexpr (std::is_same<W, A>::value) {
    memcpy(&x, p, sizeof(x));
  } else if constexpr (std::is_same<W, Bf16>::value && std::is_same<A, float>::value) {
    U16x8 h;
    memcpy(&h, p, sizeof(h));
    const U32x8 bits = __builtin_convertvector(h, U32x8) << 16;  // bf16 is float's top half
    memcpy(&x, &bits, sizeof(x));
  } else {
    for (int k = 0; k < kWidth<A>; ++k) x[k] = load<A>(p + k);
  }
  return x;
}

// |x| by clearing the sign bits (a vector select would be split into scalar compares).
template <typename A> inline Vector<A> abs_vector(Vector<A> x) {
  typename VectorOf<A>::bits b;
  memcpy(&b, &x, sizeof(b));
  b &= VectorOf<A>::kAbsMask;
  memcpy(&x, &b, sizeof(x));
  return x;
}

// x where |x| > hard, else 0 (the l0 step of the l0 + group prox, applied to the statistics).
template <typename A> inline Vector<A> keep_above(Vector<A> x, A hard) {
  typename VectorOf<A>::bits b, keep;
  const auto above = abs_vector<A>(x) > hard;  // lanes of all ones where true
  memcpy(&b, &x, sizeof(b));
  memcpy(&keep, &above, sizeof(keep));
  b &= keep;
  memcpy(&x, &b, sizeof(x));
  return x;
}

// The kUnroll accumulator vectors, then their lanes, added in order into (t1, t2): a fixed order,
// so a sum does not depend on the thread count.
template <typename A>
inline void add_lanes(Vector<A>* s1, Vector<A>* s2, A* t1, A* t2) {
  for (int u = 1; u < kUnroll; ++u) {
    s1[0] += s1[u];
    s2[0] += s2[u];
  }
  for (int k = 0; k < kWidth<A>; ++k) {
    *t1 += s1[0][k];
    *t2 += s2[0][k];
  }
}

// Sums of |x| and x^2 of a scalar loop, element i into lane i % kStep, the lanes then added in
// order. One running sum loses digits along a long strided run (error ~ n * eps: 16384 fp32
// elements of a column give 1e-5); lanes keep it near the vector loops'. A run shorter than
// kStep puts one element in each lane, so its sums are those of one running sum, bit for bit.
template <typename A> struct LaneSums {
  static constexpr int kStep = kUnroll * kWidth<A>;
  A s1[kStep], s2[kStep];  // lanes at or past `lane` are unset until the first wrap
  int lane = 0;
  bool wrapped = false;
  inline void add(A x) {
    const A a = x < 0 ? -x : x;
    if (wrapped) {
      s1[lane] += a;
      s2[lane] += x * x;
    } else {
      s1[lane] = a;
      s2[lane] = x * x;
    }
    if (++lane == kStep) {
      lane = 0;
      wrapped = true;
    }
  }
  inline void add_to(A* t1, A* t2) const {
    for (int k = 0, used = wrapped ? kStep : lane; k < used; ++k) {
      *t1 += s1[k];
      *t2 += s2[k];
    }
  }
};

// hard >= 0: only elements with |x| > hard count (l0 + group prox). Unit-stride runs sum in
// kUnroll vectors of lanes, then the vectors and lanes in order, then the tail: a fixed order,
// so the result does not depend on the thread count.
template <typename W, typename A>
void run_stats(const W* p, int64_t n, int64_t stride, A hard, A* s1_out, A* s2_out) {
  constexpr int kStep = kUnroll * kWidth<A>;
  A t1 = 0, t2 = 0;
  LaneSums<A> tail;
  int64_t i = 0;
  if (stride == 1 && n >= kStep) {
    Vector<A> s1[kUnroll] = {}, s2[kUnroll] = {};
    for (; i + kStep <= n; i += kStep) {
      for (int u = 0; u < kUnroll; ++u) {
        Vector<A> x = load_vector<W, A>(p + i + u * kWidth<A>);
        if (hard >= 0) x = keep_above<A>(x, hard);
        s1[u] += abs_vector<A>(x);
        s2[u] += x * x;
      }
    }
    add_lanes<A>(s1, s2, &t1, &t2);
  }
  for (; i < n; ++i) {
    A x = load<A>(p + i * stride);
    if (hard >= 0 && !((x < 0 ? -x : x) > hard)) x = 0;
    tail.add(x);
  }
  tail.add_to(&t1, &t2);
  *s1_out += t1;
  *s2_out += t2;
}

// sign(x) per lane: comparisons give all-ones (-1) lanes, so (x < 0) - (x > 0) is the sign.
template <typename A> inline Vector<A> sign_vector(Vector<A> x) {
  return __builtin_convertvector((x < 0) - (x > 0), Vector<A>);
}

template <typename W, typename G, typename A, bool kAccumulate>
inline void run_update_loop(const W* p, G* q, int64_t n, int64_t stride, A a, A b, A pre) {
  int64_t i = 0;
  // Same arithmetic as the scalar loop below, in vector lanes (the int conversions of
  // sign_of otherwise keep the loop at about one element per cycle).
  constexpr bool kVector = std::is_same<G, A>::value && (std::is_same<W, A>::value ||
                                                         std::is_same<W, Bf16>::value);
  if constexpr (kVector) {
    if (stride == 1) {
      for (; i + kWidth<A> <= n; i += kWidth<A>) {
        const Vector<A> x = load_vector<W, A>(p + i);
        Vector<A> update = a * sign_vector<A>(x) + b * (x * pre);
        if (kAccumulate) update += load_vector<G, A>(q + i);
        memcpy(q + i, &update, sizeof(update));
      }
    }
  }
  for (; i < n; ++i) {
    const A x = load<A>(p + i * stride);
    A update = a * sign_of(x) + b * (x * pre);
    if (kAccumulate) update += load<A>(q + i * stride);
    store<A>(q + i * stride, update);
  }
}

// q [+]= a * sign(p) + b * (p * pre); unit stride gets its own loops so they vectorize.
template <typename W, typename G, typename A>
void run_update(const W* p, G* q, int64_t n, int64_t stride, A a, A b, A pre, bool accumulate) {
  if (stride == 1) {
    if (accumulate) run_update_loop<W, G, A, true>(p, q, n, 1, a, b, pre);
    else run_update_loop<W, G, A, false>(p, q, n, 1, a, b, pre);
  } else {
    if (accumulate) run_update_loop<W, G, A, true>(p, q, n, stride, a, b, pre);
    else run_update_loop<W, G, A, false>(p, q, n, stride, a, b, pre);
  }
}

template <typename W, typename A>
void chunk_stats(const fs_segment& s, int64_t g, int64_t chunk, A* s1, A* s2, A hard = -1) {
  const W* w = reinterpret_cast<const W*>(s.w);
  const int64_t begin = chunk * s.chunk_len;
  const int64_t end = std::min(begin + s.chunk_len, s.rows * s.cols);
  *s1 = 0;
  *s2 = 0;
  for_each_run(s, g, begin, end, [&](int64_t off, int64_t n, int64_t stride) {
    run_stats<W, A>(w + off, n, stride, hard, s1, s2);
  });
}

// fp32 squares of elements below 1e-19 are subnormal, below 1e-23 they vanish, above 1e19 they
// overflow. A chunk whose fp32 sums show it (s2 below 2^-100 while s1 > 0, or s2 infinite while
// s1 is finite) is summed again in double from memory: exact, and rare enough to cost nothing.
constexpr double kTinySquares = 0x1p-100;

// (s1, s2) in double of the chunk whose sums in A are (a1, a2); hard as in chunk_stats.
template <typename W, typename A>
void exact_sums(const fs_segment& s, int64_t g, int64_t chunk, A hard, A a1, A a2, double* s1,
                double* s2) {
  *s1 = a1;
  *s2 = a2;
  const bool tiny = a1 > 0 && !(a2 >= (A)kTinySquares);
  const bool huge = std::isinf(a2) && std::isfinite(a1);
  if (std::is_same<A, double>::value || !(tiny || huge)) return;
  chunk_stats<W, double>(s, g, chunk, s1, s2, (double)hard);
}

// chunk_stats in double, exact for tiny and huge chunks.
template <typename W, typename A>
void exact_chunk_stats(const fs_segment& s, int64_t g, int64_t chunk, double* s1, double* s2,
                       A hard = -1) {
  A a1, a2;
  chunk_stats<W, A>(s, g, chunk, &a1, &a2, hard);
  exact_sums<W, A>(s, g, chunk, hard, a1, a2, s1, s2);
}

// The prox element step in vector lanes, as prox_element: soft threshold (l1), hard threshold
// (l0, l0 + group lasso), identity (group kinds).
template <typename A> inline Vector<A> prox_element_vector(int kind, Vector<A> x, A t) {
  if (kind == FS_PROX_L0 || kind == FS_PROX_L0_GROUP_LASSO) return keep_above<A>(x, t);
  if (kind != FS_PROX_L1) return x;
  typename VectorOf<A>::bits xb, db, keep;
  const Vector<A> d = abs_vector<A>(x) - t;
  const auto positive = d > 0;  // all-ones lanes where |x| > t
  memcpy(&xb, &x, sizeof(xb));
  memcpy(&db, &d, sizeof(db));
  memcpy(&keep, &positive, sizeof(keep));
  db = (db & keep) | (xb & ~VectorOf<A>::kAbsMask);  // max(|x| - t, 0) with x's sign
  Vector<A> y;
  memcpy(&y, &db, sizeof(y));
  return y;
}

// One run of the prox in place; adds (s1, s2) of the result. Unit-stride runs of fp32 / fp64
// weights go through vector lanes with kUnroll accumulators (a scalar loop is bound by the
// latency of its two running sums); the values written are the scalar loop's, element by element.
template <typename W, typename A>
void run_prox(W* p, int64_t n, int64_t stride, int kind, A t, A factor, A* s1_out, A* s2_out) {
  constexpr int kStep = kUnroll * kWidth<A>;
  A t1 = 0, t2 = 0;
  LaneSums<A> tail;
  int64_t i = 0;
  if constexpr (std::is_same<W, A>::value) {
    if (stride == 1 && n >= kStep) {
      Vector<A> s1[kUnroll] = {}, s2[kUnroll] = {};
      for (; i + kStep <= n; i += kStep) {
        for (int u = 0; u < kUnroll; ++u) {
          const Vector<A> y =
              prox_element_vector<A>(kind, load_vector<W, A>(p + i + u * kWidth<A>), t) * factor;
          memcpy(p + i + u * kWidth<A>, &y, sizeof(y));
          s1[u] += abs_vector<A>(y);
          s2[u] += y * y;
        }
      }
      add_lanes<A>(s1, s2, &t1, &t2);
    }
  }
  for (; i < n; ++i) {
    const A x = prox_element<A>(kind, load<A>(p + i * stride), t) * factor;
    store<A>(p + i * stride, x);
    tail.add(x);
  }
  tail.add_to(&t1, &t2);
  *s1_out += t1;
  *s2_out += t2;
}

// Prox step on one chunk in place: element step, then the group factor; returns (s1, s2) after.
template <typename W, typename A>
void chunk_prox(const fs_segment& s, int64_t g, int64_t chunk, int kind, A t_elem, A factor,
                A* s1, A* s2) {
  W* w = reinterpret_cast<W*>(s.w);
  const int64_t begin = chunk * s.chunk_len;
  const int64_t end = std::min(begin + s.chunk_len, s.rows * s.cols);
  *s1 = 0;
  *s2 = 0;
  for_each_run(s, g, begin, end, [&](int64_t off, int64_t n, int64_t stride) {
    run_prox<W, A>(w + off, n, stride, kind, t_elem, factor, s1, s2);
  });
}

// The SGD step of torch.optim.SGD (weight decay, momentum with dampening, Nesterov) followed by
// the prox element step, on one run of elements; adds (s1, s2) of the new weights. The weight,
// its gradient and its momentum buffer share strides. first: the buffer starts as the gradient.
template <typename A>
void run_sgd_prox(A* w, const A* grad, A* buf, int64_t n, int64_t stride, const fs_sgd_step& o,
                  int kind, A t, A* s1_out, A* s2_out) {
  const A lr = (A)o.lr, mu = (A)o.momentum, keep = (A)(1.0 - o.dampening), wd = (A)o.weight_decay;
  const bool use_momentum = o.momentum != 0;
  A t1 = 0, t2 = 0;
  LaneSums<A> tail;
  int64_t i = 0;
  constexpr int kStep = kUnroll * kWidth<A>;
  if (stride == 1 && n >= kStep) {
    Vector<A> s1[kUnroll] = {}, s2[kUnroll] = {};
    for (; i + kStep <= n; i += kStep) {
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t at = i + u * kWidth<A>;
        const Vector<A> x = load_vector<A, A>(w + at);
        Vector<A> d = load_vector<A, A>(grad + at) + wd * x;
        if (use_momentum) {
          const Vector<A> b = o.first ? d : mu * load_vector<A, A>(buf + at) + keep * d;
          memcpy(buf + at, &b, sizeof(b));
          d = o.nesterov ? d + mu * b : b;
        }
        const Vector<A> y = prox_element_vector<A>(kind, x - lr * d, t);
        memcpy(w + at, &y, sizeof(y));
        s1[u] += abs_vector<A>(y);
        s2[u] += y * y;
      }
    }
    add_lanes<A>(s1, s2, &t1, &t2);
  }
  for (; i < n; ++i) {
    const int64_t at = i * stride;
    A d = grad[at] + wd * w[at];
    if (use_momentum) {
      const A b = o.first ? d : mu * buf[at] + keep * d;
      buf[at] = b;
      d = o.nesterov ? d + mu * b : b;
    }
    const A y = prox_element<A>(kind, w[at] - lr * d, t);
    w[at] = y;
    tail.add(y);
  }
  tail.add_to(&t1, &t2);
  *s1_out += t1;
  *s2_out += t2;
}

// Adam's step (torch.optim.Adam / AdamW: decoupled weight decay; bias corrections folded into
// step_size and bias2_sqrt) followed by the prox element step on one run; adds (s1, s2).
template <typename A>
void run_adam_prox(A* w, const A* grad, A* m, A* v, int64_t n, int64_t stride,
                   const fs_adam_step& o, int kind, A t, A* s1_out, A* s2_out) {
  const A decay = o.decoupled ? (A)(1.0 - o.lr * o.weight_decay) : A(1);
  const A wd = o.decoupled ? A(0) : (A)o.weight_decay;
  const A keep1 = (A)(1.0 - o.beta1), b2 = (A)o.beta2, keep2 = (A)(1.0 - o.beta2);
  const A eps = (A)o.eps, step_size = (A)o.step_size, bias2_sqrt = (A)o.bias2_sqrt;
  A t1 = 0, t2 = 0;
  LaneSums<A> tail;
  int64_t i = 0;
  if (stride == 1) {
    Vector<A> s1 = {}, s2 = {};
    for (; i + kWidth<A> <= n; i += kWidth<A>) {
      const Vector<A> x = load_vector<A, A>(w + i) * decay;
      const Vector<A> g = load_vector<A, A>(grad + i) + wd * x;
      Vector<A> mi = load_vector<A, A>(m + i);
      mi = mi + keep1 * (g - mi);  // lerp, as torch's for weights below 0.5
      const Vector<A> vi = b2 * load_vector<A, A>(v + i) + keep2 * g * g;
      Vector<A> denom = {};
      for (int k = 0; k < kWidth<A>; ++k) denom[k] = sqrt(vi[k]) / bias2_sqrt + eps;
      const Vector<A> y = prox_element_vector<A>(kind, x - step_size * (mi / denom), t);
      memcpy(m + i, &mi, sizeof(mi));
      memcpy(v + i, &vi, sizeof(vi));
      memcpy(w + i, &y, sizeof(y));
      s1 += abs_vector<A>(y);
      s2 += y * y;
    }
    for (int k = 0; k < kWidth<A>; ++k) {
      t1 += s1[k];
      t2 += s2[k];
    }
  }
  for (; i < n; ++i) {
    const int64_t at = i * stride;
    const A x = w[at] * decay;
    const A g = grad[at] + wd * x;
    const A mi = m[at] + keep1 * (g - m[at]);
    const A vi = b2 * v[at] + keep2 * g * g;
    m[at] = mi;
    v[at] = vi;
    const A y = prox_element<A>(kind, x - step_size * (mi / (sqrt(vi) / bias2_sqrt + eps)), t);
    w[at] = y;
    tail.add(y);
  }
  tail.add_to(&t1, &t2);
  *s1_out += t1;
  *s2_out += t2;
}

// One whole group: run(offset, count, stride, s1, s2) steps each run of its elements and applies
// the element step in one pass over memory; then the group factor on the values just written
// (still in cache). Returns (s1, s2) of the result.
template <typename A, typename RunStep>
void group_step_prox(const fs_segment& s, int64_t g, int kind, double t_group, RunStep run,
                     double* s1, double* s2) {
  A* w = reinterpret_cast<A*>(s.w);
  const int64_t n = s.rows * s.cols;
  A a1 = 0, a2 = 0;
  for_each_run(s, g, 0, n, [&](int64_t off, int64_t count, int64_t stride) {
    run(off, count, stride, &a1, &a2);
  });
  exact_sums<A, A>(s, g, 0, A(-1), a1, a2, s1, s2);
  if (kind < FS_PROX_GROUP_LASSO) return;
  const A factor = (A)prox_factor<double>(kind, sqrt(*s2), t_group);
  a1 = 0;
  a2 = 0;
  for_each_run(s, g, 0, n, [&](int64_t off, int64_t count, int64_t stride) {
    run_prox<A, A>(w + off, count, stride, FS_PROX_SCALE, A(0), factor, &a1, &a2);
  });
  exact_sums<A, A>(s, g, 0, A(-1), a1, a2, s1, s2);
}

// grad [+]= a * sign(w) + b * w on one chunk, with fp64 coefficients (scale folded in).
template <typename W, typename G, typename A>
void chunk_update(const fs_segment& s, int64_t g, int64_t chunk, double a, double b) {
  A hi, pre;
  fs_split_coefficient<A>(b, &hi, &pre);
  const W* w = reinterpret_cast<const W*>(s.w);
  G* grad = reinterpret_cast<G*>(s.grad);
  const int64_t begin = chunk * s.chunk_len;
  const int64_t end = std::min(begin + s.chunk_len, s.rows * s.cols);
  for_each_run(s, g, begin, end, [&](int64_t off, int64_t n, int64_t stride) {
    run_update<W, G, A>(w + off, grad + off, n, stride, (A)a, hi, pre, s.accumulate != 0);
  });
}

// Dispatch on (weight dtype, grad dtype) to a functor templated on <W, G, A>.
template <template <typename, typename, typename> class Op, typename... Args>
void dispatch(const fs_segment& s, Args... args) {
#define FS_GRAD_CASES(W, A)                                                   \
  switch (s.grad_dtype) {                                                     \
    case FS_F32: Op<W, float, A>::run(s, args...); break;                     \
    case FS_F64: Op<W, double, A>::run(s, args...); break;                    \
    case FS_F16: Op<W, Half, A>::run(s, args...); break;                      \
    case FS_BF16: Op<W, Bf16, A>::run(s, args...); break;                     \
  }
  switch (s.w_dtype) {
    case FS_F32: FS_GRAD_CASES(float, float) break;
    case FS_F64: FS_GRAD_CASES(double, double) break;
    case FS_F16: FS_GRAD_CASES(Half, float) break;
    case FS_BF16: FS_GRAD_CASES(Bf16, float) break;
  }
#undef FS_GRAD_CASES
}

// Each Op runs the work items [begin, end) of one segment: dispatching on dtypes once per task
// rather than once per group keeps tiny groups (biases, norm scales) cheap. Stats, prox and
// update items are (group, chunk) pairs; fused items are whole groups.
template <typename W, typename G, typename A>
struct StatsOp {
  static void run(const fs_segment& s, int64_t begin, int64_t end, double hard,
                  double* partials) {
    for (int64_t item = begin; item < end; ++item) {
      exact_chunk_stats<W, A>(s, item / s.chunks, item % s.chunks, partials + 2 * item,
                              partials + 2 * item + 1, (A)hard);
    }
  }
};

template <typename W, typename G, typename A>
struct ProxOp {
  // The factor of a single-chunk group comes from its own (thresholded) norm, computed here;
  // multi-chunk groups and kind "scale" take it from factors. Element kinds need none.
  static void run(const fs_segment& s, int64_t begin, int64_t end, int kind, double t_elem,
                  double t_group, const double* factors, double* partials) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / s.chunks, chunk = item % s.chunks;
      A factor = 1;
      if (kind >= FS_PROX_GROUP_LASSO) {
        if (factors && (s.chunks > 1 || kind == FS_PROX_SCALE)) {
          factor = (A)factors[s.group_offset + g];
        } else {
          double s1, s2;
          exact_chunk_stats<W, A>(s, g, chunk, &s1, &s2,
                                  kind == FS_PROX_L0_GROUP_LASSO ? (A)t_elem : A(-1));
          factor = (A)prox_factor<double>(kind, sqrt(s2), t_group);
        }
      }
      A s1, s2;
      chunk_prox<W, A>(s, g, chunk, kind, (A)t_elem, factor, &s1, &s2);
      exact_sums<W, A>(s, g, chunk, A(-1), s1, s2, partials + 2 * item, partials + 2 * item + 1);
    }
  }
};

template <typename W, typename G, typename A>
struct UpdateOp {
  static void run(const fs_segment& s, int64_t begin, int64_t end, const double* coefs,
                  double scale) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / s.chunks;
      const double* coef = coefs + 2 * (s.group_offset + g);
      chunk_update<W, G, A>(s, g, item % s.chunks, scale * coef[0], scale * coef[1]);
    }
  }
};

template <typename W, typename G, typename A>
struct FusedOp {
  // Whole groups: statistics, rule, gradient. The second pass finds the group in cache.
  static void run(const fs_segment& s, int64_t begin, int64_t end, int kind, double alpha,
                  double scale, double* values) {
    for (int64_t g = begin; g < end; ++g) {
      double s1 = 0, s2 = 0, v, a, b;
      for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
        double c1, c2;
        exact_chunk_stats<W, A>(s, g, chunk, &c1, &c2);
        s1 += c1;
        s2 += c2;
      }
      penalty_rule<double>(kind, s1, s2, 0.0, 0.0, alpha, &v, &a, &b);
      values[s.group_offset + g] = v;
      for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
        chunk_update<W, G, A>(s, g, chunk, scale * a, scale * b);
      }
    }
  }
};

// Work is cut into tasks: consecutive items of one segment, about kTaskElements elements each,
// handed to threads dynamically (groups range from 1 to millions of elements).
constexpr int64_t kTaskElements = 1 << 15;

struct Task {
  int64_t segment, begin, end;  // items [begin, end) of the segment
};

// whole_groups: an item is a group (fused op); otherwise a (group, chunk) pair.
inline std::vector<Task> make_tasks(const fs_segment* segs, int64_t nseg, bool whole_groups) {
  std::vector<Task> tasks;
  for (int64_t si = 0; si < nseg; ++si) {
    const fs_segment& s = segs[si];
    const int64_t items = whole_groups ? s.groups : s.groups * s.chunks;
    const int64_t item_elements = whole_groups ? s.rows * s.cols : s.chunk_len;
    const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, item_elements));
    for (int64_t b = 0; b < items; b += per_task) tasks.push_back({si, b, std::min(items, b + per_task)});
  }
  return tasks;
}

// Below this many elements a call runs on one thread: waking a thread team costs more than
// the work (and much more on a loaded machine).
constexpr int64_t kParallelMinElements = 1 << 16;

inline bool worth_parallel(const fs_segment* segs, int64_t nseg) {
  int64_t elements = 0;
  for (int64_t i = 0; i < nseg; ++i) elements += segs[i].groups * segs[i].rows * segs[i].cols;
  return elements >= kParallelMinElements;
}

// Runs body(segment, task) for every task, in parallel when the call is large enough.
template <typename Body>
void run_tasks(const fs_segment* segs, int64_t nseg, bool whole_groups, Body body) {
  const std::vector<Task> tasks = make_tasks(segs, nseg, whole_groups);
  const int64_t count = (int64_t)tasks.size();
  if (!worth_parallel(segs, nseg)) {  // not even a team of one: its setup is most of a small call
    for (int64_t t = 0; t < count; ++t) body(segs[tasks[t].segment], tasks[t]);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < count; ++t) body(segs[tasks[t].segment], tasks[t]);
}

// The fused optimizer step and prox over whole groups of fp32 / fp64 segments whose weight,
// gradient and state buffers share one layout; after[group] = (s1, s2) once thresholded.
// make_run(segment index, accumulation-type tag) gives that segment's
// run(offset, count, stride, s1, s2), which steps one run of a group's elements. 1 if a segment
// does not qualify (nothing is then written).
template <typename MakeRun>
int step_prox_groups(const fs_segment* segs, int64_t nseg, int kind, double t_group,
                     double* after, MakeRun make_run) {
  for (int64_t si = 0; si < nseg; ++si) {
    if (segs[si].chunks != 1 || segs[si].w_dtype != segs[si].grad_dtype ||
        (segs[si].w_dtype != FS_F32 && segs[si].w_dtype != FS_F64))
      return 1;
  }
  run_tasks(segs, nseg, true, [&](const fs_segment& s, const Task& t) {
    auto groups = [&](auto tag) {
      using A = decltype(tag);
      const auto run = make_run(&s - segs, tag);
      for (int64_t g = t.begin; g < t.end; ++g) {
        group_step_prox<A>(s, g, kind, t_group, run, after + 2 * (s.group_offset + g),
                           after + 2 * (s.group_offset + g) + 1);
      }
    };
    if (s.w_dtype == FS_F32) groups(float(0));
    else groups(double(0));
  });
  return 0;
}

}  // namespace

extern "C" {

// Adds the chunk partials of each group (consecutive work items) in order into out[group].
static void reduce_partials(const fs_segment* segs, int64_t nseg, const double* partials, double* out) {
  const bool parallel = nseg > 64;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t si = 0; si < nseg; ++si) {
    const fs_segment& s = segs[si];
    for (int64_t g = 0; g < s.groups; ++g) {
      const double* p = partials + 2 * (s.item_offset + g * s.chunks);
      double s1 = 0, s2 = 0;
      for (int64_t c = 0; c < s.chunks; ++c) {
        s1 += p[2 * c];
        s2 += p[2 * c + 1];
      }
      out[2 * (s.group_offset + g)] = s1;
      out[2 * (s.group_offset + g) + 1] = s2;
    }
  }
}

// stats[group_offset + g] = (s1, s2) for every group of every segment; partials has room for
// 2 values per work item. hard >= 0: only elements with |w| > hard count.
int fs_cpu_group_stats(const fs_segment* segs, int64_t nseg, double* stats, double* partials,
                       double hard) {
  run_tasks(segs, nseg, false, [&](const fs_segment& s, const Task& t) {
    dispatch<StatsOp>(s, t.begin, t.end, hard, partials + 2 * s.item_offset);
  });
  reduce_partials(segs, nseg, partials, stats);
  return 0;
}

// Prox step in place on every group; after[group] = (s1, s2) once thresholded.
int fs_cpu_prox(const fs_segment* segs, int64_t nseg, int kind, double t_elem, double t_group,
                const double* factors, double* after, double* partials) {
  run_tasks(segs, nseg, false, [&](const fs_segment& s, const Task& t) {
    dispatch<ProxOp>(s, t.begin, t.end, kind, t_elem, t_group, factors,
                     partials + 2 * s.item_offset);
  });
  reduce_partials(segs, nseg, partials, after);
  return 0;
}

// One fused SGD step and prox over whole groups (every segment: chunks == 1, weight, gradient
// and buffer of one floating dtype, the buffer addresses in bufs[segment]); after[group] = (s1, s2)
// once thresholded. l0_group_lasso's element stage uses t_elem, its group stage t_group.
int fs_cpu_sgd_prox(const fs_segment* segs, int64_t nseg, const int64_t* bufs,
                    const fs_sgd_step* step, int kind, double t_elem, double t_group,
                    double* after) {
  const fs_sgd_step& o = *step;
  return step_prox_groups(segs, nseg, kind, t_group, after, [&](int64_t si, auto tag) {
    using A = decltype(tag);
    A* w = reinterpret_cast<A*>(segs[si].w);
    const A* grad = reinterpret_cast<const A*>(segs[si].grad);
    A* buf = reinterpret_cast<A*>(bufs[si]);
    return [=, &o](int64_t off, int64_t n, int64_t stride, A* s1, A* s2) {
      run_sgd_prox<A>(w + off, grad + off, buf + off, n, stride, o, kind, (A)t_elem, s1, s2);
    };
  });
}

// One fused Adam / AdamW step and prox, as fs_cpu_sgd_prox; exp_avg and exp_avg_sq addresses in
// ms[segment] and vs[segment]; step_size = lr / (1 - beta1^t), bias2_sqrt = sqrt(1 - beta2^t).
int fs_cpu_adam_prox(const fs_segment* segs, int64_t nseg, const int64_t* ms, const int64_t* vs,
                     const fs_adam_step* step, int kind, double t_elem, double t_group,
                     double* after) {
  const fs_adam_step& o = *step;
  return step_prox_groups(segs, nseg, kind, t_group, after, [&](int64_t si, auto tag) {
    using A = decltype(tag);
    A* w = reinterpret_cast<A*>(segs[si].w);
    const A* grad = reinterpret_cast<const A*>(segs[si].grad);
    A* m = reinterpret_cast<A*>(ms[si]);
    A* v = reinterpret_cast<A*>(vs[si]);
    return [=, &o](int64_t off, int64_t n, int64_t stride, A* s1, A* s2) {
      run_adam_prox<A>(w + off, grad + off, m + off, v + off, n, stride, o, kind, (A)t_elem, s1,
                       s2);
    };
  });
}

// values[g], coefs[g] = rule(stats[g], segment_sums[segment_of_group[g]]) for every group.
int fs_cpu_rule(const double* stats, const int32_t* segment_of_group,
                const double* segment_sums, int64_t total_groups, int kind, double alpha,
                double* values, double* coefs) {
  const bool parallel = total_groups >= 4096;
  const bool across = kind == FS_GROUP_L1L2 || kind == FS_GROUP_HOYER_SQUARE;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < total_groups; ++g) {
    double total_l = 0, total_f2 = 0;
    if (across) {
      total_l = segment_sums[2 * segment_of_group[g]];
      total_f2 = segment_sums[2 * segment_of_group[g] + 1];
    }
    penalty_rule<double>(kind, stats[2 * g], stats[2 * g + 1], total_l, total_f2, alpha,
                         values + g, coefs + 2 * g, coefs + 2 * g + 1);
  }
  return 0;
}

// grad = [grad +] scale * (a_g * sign(w) + b_g * w) with coefs[group] = (a_g, b_g).
int fs_cpu_apply(const fs_segment* segs, int64_t nseg, const double* coefs, double scale) {
  run_tasks(segs, nseg, false, [&](const fs_segment& s, const Task& t) {
    dispatch<UpdateOp>(s, t.begin, t.end, coefs, scale);
  });
  return 0;
}

// Within-group kinds in one pass per group: values[group] and grad [+]= scale * dR/dw.
int fs_cpu_fused(const fs_segment* segs, int64_t nseg, int kind, double alpha, double scale,
                 double* values) {
  run_tasks(segs, nseg, true, [&](const fs_segment& s, const Task& t) {
    dispatch<FusedOp>(s, t.begin, t.end, kind, alpha, scale, values);
  });
  return 0;
}

}  // extern "C"

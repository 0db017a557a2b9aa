// CUDA kernels of the native backend: the same operations as cpu_kernels.cpp, one thread block
// per work item (segment, group, chunk). Block reductions use a fixed tree in shared memory and
// chunk partials are added in order, so results are deterministic (no atomics). Plain C ABI:
// the segment table, stats and coefficients are device buffers owned by torch tensors, and the
// caller passes torch's current stream. Built just in time by fastsparse/backends/native.py.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "fastsparse_native.h"

namespace {

constexpr int kThreads = 256;

struct Bf16 { uint16_t bits; };
struct Half { uint16_t bits; };

template <typename A> __device__ __forceinline__ A load(const float* p) { return (A)*p; }
template <typename A> __device__ __forceinline__ A load(const double* p) { return (A)*p; }
template <typename A> __device__ __forceinline__ A load(const Half* p) {
  return (A)fs_half_to_float(p->bits);
}
template <typename A> __device__ __forceinline__ A load(const Bf16* p) {
  return (A)fs_bf16_to_float(p->bits);
}
template <typename A> __device__ __forceinline__ void store(float* p, A v) { *p = (float)v; }
template <typename A> __device__ __forceinline__ void store(double* p, A v) { *p = (double)v; }
template <typename A> __device__ __forceinline__ void store(Half* p, A v) {
  p->bits = fs_float_to_half((float)v);
}
template <typename A> __device__ __forceinline__ void store(Bf16* p, A v) {
  p->bits = fs_float_to_bf16((float)v);
}

__device__ __forceinline__ int64_t element_offset(const fs_segment& s, int64_t g, int64_t j) {
  if (s.rows == 1) return g * s.stride_group + j * s.stride_col;
  return g * s.stride_group + (j / s.cols) * s.stride_row + (j % s.cols) * s.stride_col;
}

__device__ int64_t segment_of_item(const fs_segment* segs, int64_t nseg, int64_t item) {
  int64_t lo = 0, hi = nseg;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (segs[mid].item_offset <= item) lo = mid; else hi = mid;
  }
  return lo;
}

// Sum of two values over the block, in a fixed order; every thread gets the result.
template <typename A>
__device__ void block_sum2(A* x, A* y) {
  __shared__ A shared_x[kThreads], shared_y[kThreads];
  shared_x[threadIdx.x] = *x;
  shared_y[threadIdx.x] = *y;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared_x[threadIdx.x] += shared_x[threadIdx.x + stride];
      shared_y[threadIdx.x] += shared_y[threadIdx.x + stride];
    }
    __syncthreads();
  }
  *x = shared_x[0];
  *y = shared_y[0];
  __syncthreads();
}

// hard >= 0: only elements with |x| > hard count (l0 + group prox). The sums run in double:
// fp32 squares of elements below 1e-19 are subnormal and below 1e-23 vanish (exact on tiny
// groups, fastsparse_native.h).
template <typename W, typename A>
__device__ void chunk_stats(const fs_segment& s, int64_t g, int64_t chunk, double* s1,
                            double* s2, A hard = -1) {
  const W* w = reinterpret_cast<const W*>(s.w);
  const int64_t begin = chunk * s.chunk_len;
  const int64_t end = min(begin + s.chunk_len, s.rows * s.cols);
  double a1 = 0, a2 = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    A x = load<A>(w + element_offset(s, g, j));
    if (hard >= 0 && !(fabs(x) > hard)) x = 0;
    a1 += fabs((double)x);
    a2 += (double)x * x;
  }
  block_sum2(&a1, &a2);
  *s1 = a1;
  *s2 = a2;
}

// Prox step on one chunk in place; (s1, s2) after it, summed over the block.
template <typename W, typename A>
__device__ void chunk_prox(const fs_segment& s, int64_t g, int64_t chunk, int kind, A t_elem,
                           A factor, double* s1, double* s2) {
  W* w = reinterpret_cast<W*>(s.w);
  const int64_t begin = chunk * s.chunk_len;
  const int64_t end = min(begin + s.chunk_len, s.rows * s.cols);
  double a1 = 0, a2 = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const int64_t off = element_offset(s, g, j);
    const A x = prox_element<A>(kind, load<A>(w + off), t_elem) * factor;
    store<A>(w + off, x);
    a1 += fabs((double)x);
    a2 += (double)x * x;
  }
  block_sum2(&a1, &a2);
  *s1 = a1;
  *s2 = a2;
}

// grad [+]= a * sign(w) + b * w with fp64 coefficients (scale folded in), b * w applied as
// hi * (w * pre) (fs_split_coefficient).
template <typename W, typename G, typename A>
__device__ void chunk_update(const fs_segment& s, int64_t g, int64_t chunk, double a_, double b) {
  A hi, pre;
  fs_split_coefficient<A>(b, &hi, &pre);
  const A a = (A)a_;
  const W* w = reinterpret_cast<const W*>(s.w);
  G* grad = reinterpret_cast<G*>(s.grad);
  const int64_t begin = chunk * s.chunk_len;
  const int64_t end = min(begin + s.chunk_len, s.rows * s.cols);
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const int64_t off = element_offset(s, g, j);
    const A x = load<A>(w + off);
    const A sign = (A)((x > 0) - (x < 0));
    A update = a * sign + hi * (x * pre);
    if (s.accumulate) update += load<A>(grad + off);
    store<A>(grad + off, update);
  }
}

template <typename W, typename G, typename A>
struct StatsOp {
  static __device__ void run(const fs_segment& s, int64_t g, int64_t chunk, double hard,
                             double* partial) {
    double s1, s2;
    chunk_stats<W, A>(s, g, chunk, &s1, &s2, (A)hard);
    if (threadIdx.x == 0) {
      partial[0] = s1;
      partial[1] = s2;
    }
  }
};

template <typename W, typename G, typename A>
struct ProxOp {
  // Single-chunk groups compute their factor here; multi-chunk ones and "scale" read factors.
  static __device__ void run(const fs_segment& s, int64_t g, int64_t chunk, int kind,
                             double t_elem, double t_group, const double* factors,
                             double* partial) {
    A factor = 1;
    if (kind >= FS_PROX_GROUP_LASSO) {
      if (factors && (s.chunks > 1 || kind == FS_PROX_SCALE)) {
        factor = (A)factors[s.group_offset + g];
      } else {
        double s1, s2;
        chunk_stats<W, A>(s, g, chunk, &s1, &s2,
                          kind == FS_PROX_L0_GROUP_LASSO ? (A)t_elem : A(-1));
        factor = (A)prox_factor<double>(kind, sqrt(s2), t_group);
      }
    }
    __syncthreads();  // every thread has read the group before anyone writes it
    double s1, s2;
    chunk_prox<W, A>(s, g, chunk, kind, (A)t_elem, factor, &s1, &s2);
    if (threadIdx.x == 0) {
      partial[0] = s1;
      partial[1] = s2;
    }
  }
};

template <typename W, typename G, typename A>
struct UpdateOp {
  static __device__ void run(const fs_segment& s, int64_t g, int64_t chunk, const double* coef,
                             double scale) {
    chunk_update<W, G, A>(s, g, chunk, scale * coef[0], scale * coef[1]);
  }
};

template <typename W, typename G, typename A>
struct FusedOp {
  // A whole group per block: statistics, rule, gradient; the second pass mostly hits L1/L2.
  static __device__ void run(const fs_segment& s, int64_t g, int kind, double alpha,
                             double scale, double* value) {
    double s1 = 0, s2 = 0;
    for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
      double c1, c2;
      chunk_stats<W, A>(s, g, chunk, &c1, &c2);
      s1 += c1;
      s2 += c2;
    }
    double v, a, b;
    penalty_rule<double>(kind, s1, s2, 0.0, 0.0, alpha, &v, &a, &b);
    if (threadIdx.x == 0) *value = v;
    for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
      chunk_update<W, G, A>(s, g, chunk, scale * a, scale * b);
    }
  }
};

template <template <typename, typename, typename> class Op, typename... Args>
__device__ void dispatch(const fs_segment& s, Args... args) {
#define FS_GRAD_CASES(W, A)                                  \
  switch (s.grad_dtype) {                                    \
    case FS_F32: Op<W, float, A>::run(s, args...); break;    \
    case FS_F64: Op<W, double, A>::run(s, args...); break;   \
    case FS_F16: Op<W, Half, A>::run(s, args...); break;     \
    case FS_BF16: Op<W, Bf16, A>::run(s, args...); break;    \
  }
  switch (s.w_dtype) {
    case FS_F32: FS_GRAD_CASES(float, float) break;
    case FS_F64: FS_GRAD_CASES(double, double) break;
    case FS_F16: FS_GRAD_CASES(Half, float) break;
    case FS_BF16: FS_GRAD_CASES(Bf16, float) break;
  }
#undef FS_GRAD_CASES
}

__global__ void stats_kernel(const fs_segment* segs, int64_t nseg, double hard,
                             double* partials) {
  const int64_t item = blockIdx.x;
  const fs_segment& s = segs[segment_of_item(segs, nseg, item)];
  const int64_t local = item - s.item_offset;
  dispatch<StatsOp>(s, local / s.chunks, local % s.chunks, hard, partials + 2 * item);
}

__global__ void prox_kernel(const fs_segment* segs, int64_t nseg, int kind, double t_elem,
                            double t_group, const double* factors, double* partials) {
  const int64_t item = blockIdx.x;
  const fs_segment& s = segs[segment_of_item(segs, nseg, item)];
  const int64_t local = item - s.item_offset;
  dispatch<ProxOp>(s, local / s.chunks, local % s.chunks, kind, t_elem, t_group, factors,
                   partials + 2 * item);
}

__global__ void reduce_partials_kernel(const fs_segment* segs, int64_t nseg, int64_t items,
                                       const double* partials, double* stats) {
  const int64_t item = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (item >= items) return;
  const fs_segment& s = segs[segment_of_item(segs, nseg, item)];
  const int64_t local = item - s.item_offset;
  if (local % s.chunks != 0) return;  // one thread per group: the one of its first chunk
  const int64_t g = local / s.chunks;
  double s1 = 0, s2 = 0;
  for (int64_t c = 0; c < s.chunks; ++c) {
    s1 += partials[2 * (item + c)];
    s2 += partials[2 * (item + c) + 1];
  }
  stats[2 * (s.group_offset + g)] = s1;
  stats[2 * (s.group_offset + g) + 1] = s2;
}

__global__ void rule_kernel(const double* stats, const int32_t* segment_of_group,
                            const double* segment_sums, int64_t total_groups, int kind,
                            double alpha, double* values, double* coefs) {
  const int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (g >= total_groups) return;
  double total_l = 0, total_f2 = 0;
  if (kind == FS_GROUP_L1L2 || kind == FS_GROUP_HOYER_SQUARE) {
    total_l = segment_sums[2 * segment_of_group[g]];
    total_f2 = segment_sums[2 * segment_of_group[g] + 1];
  }
  penalty_rule<double>(kind, stats[2 * g], stats[2 * g + 1], total_l, total_f2, alpha,
                       values + g, coefs + 2 * g, coefs + 2 * g + 1);
}

__global__ void apply_kernel(const fs_segment* segs, int64_t nseg, const double* coefs,
                             double scale, const double* scale_ptr) {
  const int64_t item = blockIdx.x;
  const fs_segment& s = segs[segment_of_item(segs, nseg, item)];
  const int64_t local = item - s.item_offset, g = local / s.chunks;
  const double factor = scale_ptr ? scale * *scale_ptr : scale;
  dispatch<UpdateOp>(s, g, local % s.chunks, coefs + 2 * (s.group_offset + g), factor);
}

__global__ void fused_kernel(const fs_segment* segs, int64_t nseg, int kind, double alpha,
                             double scale, double* values) {
  const int64_t item = blockIdx.x;  // fused segments have one chunk per group: item = group
  const fs_segment& s = segs[segment_of_item(segs, nseg, item)];
  const int64_t g = item - s.item_offset;
  dispatch<FusedOp>(s, g, kind, alpha, scale, values + s.group_offset + g);
}

inline int blocks_for(int64_t n) { return (int)((n + kThreads - 1) / kThreads); }

}  // namespace

extern "C" {

int fs_cuda_group_stats(const fs_segment* segs, int64_t nseg, int64_t items, double* stats,
                        double* partials, double hard, void* stream) {
  if (items == 0) return 0;
  cudaStream_t st = (cudaStream_t)stream;
  stats_kernel<<<(unsigned)items, kThreads, 0, st>>>(segs, nseg, hard, partials);
  reduce_partials_kernel<<<blocks_for(items), kThreads, 0, st>>>(segs, nseg, items, partials,
                                                                  stats);
  return (int)cudaGetLastError();
}

int fs_cuda_prox(const fs_segment* segs, int64_t nseg, int64_t items, int kind, double t_elem,
                 double t_group, const double* factors, double* after, double* partials,
                 void* stream) {
  if (items == 0) return 0;
  cudaStream_t st = (cudaStream_t)stream;
  prox_kernel<<<(unsigned)items, kThreads, 0, st>>>(segs, nseg, kind, t_elem, t_group, factors,
                                                     partials);
  reduce_partials_kernel<<<blocks_for(items), kThreads, 0, st>>>(segs, nseg, items, partials,
                                                                  after);
  return (int)cudaGetLastError();
}

int fs_cuda_rule(const double* stats, const int32_t* segment_of_group,
                 const double* segment_sums, int64_t total_groups, int kind, double alpha,
                 double* values, double* coefs, void* stream) {
  if (total_groups == 0) return 0;
  rule_kernel<<<blocks_for(total_groups), kThreads, 0, (cudaStream_t)stream>>>(
      stats, segment_of_group, segment_sums, total_groups, kind, alpha, values, coefs);
  return (int)cudaGetLastError();
}

int fs_cuda_apply(const fs_segment* segs, int64_t nseg, int64_t items, const double* coefs,
                  double scale, const double* scale_ptr, void* stream) {
  if (items == 0) return 0;
  apply_kernel<<<(unsigned)items, kThreads, 0, (cudaStream_t)stream>>>(segs, nseg, coefs, scale,
                                                                       scale_ptr);
  return (int)cudaGetLastError();
}

int fs_cuda_fused(const fs_segment* segs, int64_t nseg, int64_t items, int kind, double alpha,
                  double scale, double* values, void* stream) {
  if (items == 0) return 0;
  fused_kernel<<<(unsigned)items, kThreads, 0, (cudaStream_t)stream>>>(segs, nseg, kind, alpha,
                                                                       scale, values);
  return (int)cudaGetLastError();
}

}  // extern "C"

// Shared definitions of the native backend (CPU C++ and CUDA C++).
//
// The native libraries expose a plain C ABI (extern "C", raw addresses and int64 fields) and
// include no torch headers, so one build works with any torch version: Python passes tensor
// addresses through ctypes (fastsparse/backends/native.py). Everything here must compile both as C++17
// and as CUDA C++.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

// dtype codes shared with fastsparse/backends/native.py
enum { FS_F32 = 0, FS_F64 = 1, FS_F16 = 2, FS_BF16 = 3 };

// One (tensor, grouping) pair; see fastsparse/core/layout.py. The elements of group g are
// w + g*stride_group + r*stride_row + c*stride_col for r < rows, c < cols. A group is processed
// in chunks of chunk_len elements (chunk_len = rows*cols when the group fits one chunk).
// Mirrors NATIVE_FIELDS in fastsparse/backends/native.py: keep the order in sync.
typedef struct {
  int64_t w;             // weight address
  int64_t grad;          // gradient address (same strides as the weight), 0 if unused
  int64_t groups, rows, cols;
  int64_t stride_group, stride_row, stride_col;
  int64_t group_offset;  // global id of group 0: row in stats / coefs / values
  int64_t chunks, chunk_len;
  int64_t item_offset;   // first work item (group-major, chunk-minor) of this segment
  int64_t w_dtype, grad_dtype;
  int64_t accumulate;    // 1: grad += update, 0: grad = update
} fs_segment;

// The fused optimizer steps' options, field for field SGDStepOptions and AdamStepOptions of
// fastsparse/core/contract.py (floats as double, flags as int): fastsparse/backends/native.py
// builds its ctypes mirrors from those NamedTuples, so keep the order in sync.
typedef struct {
  double lr, momentum, dampening, weight_decay;
  int nesterov;
  int first;             // the momentum buffer starts as the gradient (its contents not read)
} fs_sgd_step;

typedef struct {
  double lr, beta1, beta2, eps, weight_decay;
  int decoupled;         // AdamW's weight decay (w *= 1 - lr * weight_decay)
  double step_size;      // lr / (1 - beta1^t)
  double bias2_sqrt;     // sqrt(1 - beta2^t)
} fs_adam_step;

// Kinds, as in fastsparse/core/contract.py KIND_IDS.
enum {
  FS_L1 = 0,
  FS_L2 = 1,
  FS_GROUP_LASSO = 2,
  FS_L1L2 = 3,
  FS_HOYER_SQUARE = 4,
  FS_SPARSE_GROUP_LASSO = 5,
  FS_GROUP_L1L2 = 6,
  FS_GROUP_HOYER_SQUARE = 7,
};

// The coefficient rule of the contract: value term and (a, b) with dR/dw = a*sign(w) + b*w.
// Every backend runs it in double (A = double), on exact statistics.
// total_l, total_f2: the segment's L = sum of group norms and F^2 (across-group kinds only).
// Zero groups give zeros, never NaN.
template <typename A>
FS_HD void penalty_rule(int kind, A s1, A s2, A total_l, A total_f2, A alpha, A* value, A* a,
                        A* b) {
  *value = 0;
  *a = 0;
  *b = 0;
  if (!(s2 > 0)) return;
  const A n = sqrt(s2);
  const A inv_n = A(1) / n;
  switch (kind) {
    case FS_L1: *value = s1; *a = 1; break;
    case FS_L2: *value = A(0.5) * s2; *b = 1; break;
    case FS_GROUP_LASSO: *value = n; *b = inv_n; break;
    case FS_L1L2: *value = s1 * inv_n; *a = inv_n; *b = -s1 * inv_n * inv_n * inv_n; break;
    case FS_HOYER_SQUARE: {
      const A ratio = s1 / s2;
      *value = s1 * ratio;
      *a = A(2) * ratio;
      *b = A(-2) * ratio * ratio;
      break;
    }
    case FS_SPARSE_GROUP_LASSO:
      *value = alpha * s1 + (A(1) - alpha) * n;
      *a = alpha;
      *b = (A(1) - alpha) * inv_n;
      break;
    case FS_GROUP_L1L2: {
      if (!(total_f2 > 0)) return;
      const A inv_f2 = A(1) / total_f2;
      const A inv_f = sqrt(inv_f2);
      *value = n * inv_f;
      *b = inv_n * inv_f - total_l * inv_f * inv_f2;
      break;
    }
    case FS_GROUP_HOYER_SQUARE: {
      if (!(total_f2 > 0)) return;
      const A inv_f2 = A(1) / total_f2;
      *value = n * total_l * inv_f2;
      *b = A(2) * total_l * inv_f2 * inv_n - A(2) * total_l * total_l * inv_f2 * inv_f2;
      break;
    }
    default: break;
  }
}

// --- exact on tiny groups ------------------------------------------------------------------
// A group of fp32 weights with norm 1e-30 has s2 = 1e-60 (0 in fp32) and coefficients up to
// 1/n^3 = 1e90: statistics, the rule and the factors are therefore computed in double, and b*x
// is applied as hi * (x * pre) with pre a power of two near sqrt|b|, each factor within fp32.

// 2^k, exact, for k in [-1022, 1023].
FS_HD double fs_pow2(int k) {
  union { uint64_t u; double d; } v;
  v.u = (uint64_t)(k + 1023) << 52;
  return v.d;
}

// The exponent field of x, unbiased: floor(log2 |x|) for normal x, -1023 for 0.
FS_HD int fs_exponent(double x) {
  union { uint64_t u; double d; } v;
  v.d = x;
  return (int)((v.u >> 52) & 0x7ff) - 1023;
}

// (hi, pre) in the accumulation type A with b*x == hi * (x*pre) (exact scaling by powers of 2).
template <typename A>
FS_HD void fs_split_coefficient(double b, A* hi, A* pre) {
  if (sizeof(A) == sizeof(double)) {
    *hi = (A)b;
    *pre = A(1);
    return;
  }
  int half = fs_exponent(b) / 2;
  half = half < -126 ? -126 : (half > 126 ? 126 : half);
  const double p = fs_pow2(half);
  *hi = (A)(b / p);
  *pre = (A)p;
}

// Prox kinds, as in fastsparse/core/contract.py PROX_IDS; "scale" multiplies groups by given factors.
enum { FS_PROX_L1 = 0, FS_PROX_L0 = 1, FS_PROX_GROUP_LASSO = 2, FS_PROX_GROUP_L0 = 3,
       FS_PROX_L0_GROUP_LASSO = 4, FS_PROX_SCALE = 5 };

// Element step of the prox kinds (before any group factor).
template <typename A>
FS_HD A prox_element(int kind, A x, A t) {
  const A ax = x < 0 ? -x : x;
  if (kind == FS_PROX_L1) return ax > t ? (x > 0 ? ax - t : t - ax) : A(0);
  if (kind == FS_PROX_L0 || kind == FS_PROX_L0_GROUP_LASSO) return ax > t ? x : A(0);
  return x;
}

// Group factor of the group prox kinds from the group's norm: 0 for dead groups (n <= t).
template <typename A>
FS_HD A prox_factor(int kind, A n, A t) {
  if (!(n > t)) return A(0);
  return kind == FS_PROX_GROUP_L0 ? A(1) : A(1) - t / n;
}

// fp16 / bf16 <-> float, bit-exact and portable (round to nearest even on the way down).
FS_HD float fs_bf16_to_float(uint16_t h) {
  union { uint32_t u; float f; } v;
  v.u = (uint32_t)h << 16;
  return v.f;
}

FS_HD uint16_t fs_float_to_bf16(float f) {
  union { uint32_t u; float f; } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  // NaN stays NaN
  v.u += 0x7fffu + ((v.u >> 16) & 1u);
  return (uint16_t)(v.u >> 16);
}

FS_HD float fs_half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  union { uint32_t u; float f; } v;
  if (exponent == 0x1f) {
    v.u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      v.u = sign;
    } else {  // subnormal: normalize
      int shift = 0;
      while (!(mantissa & 0x400u)) { mantissa <<= 1; ++shift; }
      mantissa &= 0x3ffu;
      v.u = sign | ((uint32_t)(113 - shift) << 23) | (mantissa << 13);
    }
  } else {
    v.u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  return v.f;
}

FS_HD uint16_t fs_float_to_half(float f) {
  union { uint32_t u; float f; } v;
  v.f = f;
  const uint32_t sign = (v.u >> 16) & 0x8000u;
  const uint32_t abs = v.u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to infinity
  if (abs < 0x38800000u) {  // subnormal or zero in half
    if (abs < 0x33000000u) return (uint16_t)sign;  // below half the smallest subnormal
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14 + (112 - exponent) ... into 10-bit field
    const uint32_t rounded = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    uint32_t result = rounded + ((rest > half || (rest == half && (rounded & 1))) ? 1 : 0);
    return (uint16_t)(sign | result);
  }
  uint32_t result = ((abs >> 13) - (112u << 10));
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (result & 1))) ++result;
  return (uint16_t)(sign | result);
}

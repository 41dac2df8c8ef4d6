// CPU implementation of the fused ops: OpenMP-parallel (at::parallel_for,
// whose backend is OpenMP in standard torch builds) over chunks of one batch
// row, with the per-element work in short `omp simd` loops over stack buffers:
// one loop generates the chunk's noise (Philox rounds, log, cos: all
// vectorised), one applies the formula of fused_math.h.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "fused_math.h"
#include "kernel_args.h"

namespace fastddpm {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The noise loops are compiled for AVX-512 and AVX2 too and picked at load
// time (AVX-512's 64-bit multiplies and conversions make them ~2.5x faster).
#define FASTDDPM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default"), noinline))
#else
#define FASTDDPM_CPU_CLONES
#endif

constexpr int64_t kChunk = 256;       // elements per inner loop (stack buffers)
constexpr int64_t kGrain = 32768;     // elements per parallel task
constexpr int64_t kLossBlock = 65536; // elements per partial sum of the loss

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// bfloat16 is the high half of a float32: a shift the vectoriser handles.
inline float to_float(c10::BFloat16 v) {
  return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(v.x) << 16));
}

inline int64_t row_value(const RowIndex& index, int64_t b) {
  return index.data[b * index.stride];
}

inline uint64_t sample_word(int64_t sample_offset, int64_t b) {
  return static_cast<uint64_t>(sample_offset + b) << 32;
}

// -- vectorisable noise ----------------------------------------------------------------------
// glibc's logf/cosf are calls the compiler cannot vectorise, so the CPU noise
// uses branch-free float32 versions of them (within an ulp or two: the
// contract allows a few ulp between libraries; the Philox integers are exact).
// log(x) for a normal x > 0 (FreeBSD/musl logf, < 1 ulp).
inline float log_normal_f32(float x) {
  constexpr float kLn2Hi = 6.9313812256e-01f, kLn2Lo = 9.0580006145e-06f;
  constexpr float kLg1 = 0.66666662693f, kLg2 = 0.40000972152f, kLg3 = 0.28498786688f, kLg4 = 0.24279078841f;
  const int32_t ix = float_to_bits(x) + (0x3f800000 - 0x3f3504f3);
  const float k = static_cast<float>((ix >> 23) - 0x7f);
  const float f = bits_to_float((ix & 0x007fffff) + 0x3f3504f3) - 1.0f;  // x = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2))
  const float s = f / (2.0f + f);
  const float z = s * s, w = z * z;
  const float r = z * (kLg1 + w * kLg3) + w * (kLg2 + w * kLg4);
  const float hfsq = 0.5f * f * f;
  return s * (hfsq + r) + k * kLn2Lo - hfsq + f + k * kLn2Hi;
}

// cos(x) for 0 <= x < 8192 (Cephes cosf): reduce by pi/4 in three exact-ish
// parts, then the sin or cos polynomial of the octant, selected without branches.
inline float cos_f32(float x) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // x * 4/pi
  j += j & 1;
  const float y = static_cast<float>(j);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  j &= 7;  // cos(r + j pi/4) = cos r, -sin r, -cos r, sin r for j = 0, 2, 4, 6
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float sn = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  // bitwise select and sign, not ?:, which the vectoriser leaves as branches
  const int32_t use_sin = -((j >> 1) & 1);   // all ones for j = 2, 6
  const int32_t sign = ((j + 2) & 4) << 29;  // the sign bit for j = 2, 4
  return bits_to_float(((float_to_bits(sn) & use_sin) | (float_to_bits(c) & ~use_sin)) ^ sign);
}

// Box-Muller of fused_math.h with the vectorisable log and cos.
inline float box_muller_vec(uint32_t i1, uint32_t i2) {
  // max(u1, 1e-7) as an integer max of the bits (both >= 0): a float ?: here
  // keeps the loop from vectorising
  const float u1 = bits_to_float(std::max(float_to_bits(uint_to_uniform(i1)), float_to_bits(kU1Min)));
  const float th = kTwoPi * uint_to_uniform(i2);
  return std::sqrt(-2.0f * log_normal_f32(u1)) * cos_f32(th);
}

inline float normal_vec(PhiloxKey key, uint64_t offset) {
  const PhiloxWords w = philox4x32_10(key.k0, key.k1, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  return box_muller_vec(w.x0, w.x1);
}

// Normals of `len` consecutive counters `hi | (lo + i)`, one vectorised loop.
FASTDDPM_CPU_CLONES void normals(PhiloxKey key, uint64_t hi, uint64_t lo, int64_t len, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) z[i] = normal_vec(key, hi | (lo + static_cast<uint64_t>(i)));
}

FASTDDPM_CPU_CLONES void normals_at(PhiloxKey key, const int64_t* offsets, int64_t len, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) z[i] = normal_vec(key, static_cast<uint64_t>(offsets[i]));
}

// body(b, j, len) for every piece of the flat range [0, n * numel) that lies in
// one row and is at most kChunk long; pieces run in parallel.
template <typename Body>
void for_each_chunk(int64_t n, int64_t numel, const Body& body) {
  at::parallel_for(0, n * numel, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / numel;
      const int64_t j = i - b * numel;
      const int64_t len = std::min({end - i, numel - j, kChunk});
      body(b, j, len);
      i += len;
    }
  });
}

// fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a compile-time constant.
template <typename Fn>
void dispatch_bool(bool flag, const Fn& fn) {
  if (flag) fn(std::true_type{}); else fn(std::false_type{});
}

// fn(clip, guided, thresholded) with the three flags as compile-time constants, so the per-element
// loops have no branch on them and the unguided, unthresholded loop is today's.  Thresholded, the
// bound replaces the clip (fused_math.h's denoised_value ignores `clip` then).
template <typename Fn>
void dispatch_flags(bool clip, bool guided, bool thresholded, const Fn& fn) {
  dispatch_bool(clip, [&](auto c) {
    dispatch_bool(guided, [&](auto g) { dispatch_bool(thresholded, [&](auto t) { fn(c, g, t); }); });
  });
}

// The model output a step uses at element i: c, or with guidance u + w (c - u) (fused_math.h).
template <bool guided, typename out_t>
inline float step_output(const out_t* out, const out_t* uncond, float w, int64_t i) {
  const float c = to_float(out[i]);
  return guided ? guided_value(c, to_float(uncond[i]), w) : c;
}

template <typename Fn>
void dispatch_float(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
  }
}

// The low-precision model input: contiguous, or [n, C, H, W] in channels_last
// order (element j = c * HW + s of row b goes to b * numel + s * C + c).  Args: StepArgs or
// MultistepArgs (the same model_input fields).
template <typename in_t, typename Args>
void store_model_input(const Args& a, int64_t b, int64_t j, int64_t len, const float* xp) {
  in_t* dst = static_cast<in_t*>(a.model_input) + b * a.numel;
  if (!a.channels_last) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[j + i] = static_cast<in_t>(xp[i]);
    return;
  }
  int64_t c = j / a.spatial, s = j - c * a.spatial;
  for (int64_t i = 0; i < len; ++i) {
    dst[s * a.channels + c] = static_cast<in_t>(xp[i]);
    if (++s == a.spatial) {
      s = 0;
      ++c;
    }
  }
}

template <typename x0_t>
void q_sample_impl(const QSampleArgs& a) {
  const PhiloxKey key = philox_key(a.seed);
  const x0_t* x0 = static_cast<const x0_t*>(a.x0);
  for_each_chunk(a.n, a.numel, [&](int64_t b, int64_t j, int64_t len) {
    const int64_t t = row_value(a.t, b);
    const float sqrt_alphas_cumprod_t = a.sqrt_alphas_cumprod[t];
    const float sqrt_one_minus_alphas_cumprod_t = a.sqrt_one_minus_alphas_cumprod[t];
    float z[kChunk];
    normals(key, sample_word(a.sample_offset, b), static_cast<uint64_t>(j), len, z);  // slot 0
    const x0_t* src = x0 + b * a.numel + j;
    float* dst = a.x_t + b * a.numel + j;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      dst[i] = q_sample_value(sqrt_alphas_cumprod_t, sqrt_one_minus_alphas_cumprod_t, to_float(src[i]), z[i]);
    }
  });
}

// The step formula over a chunk; `clip`, `guided` and `thresholded` template arguments so the loop
// has no branch (uncond is read only when guided; s, the row's bound, used only when thresholded).
template <bool clip, bool guided, bool thresholded, typename out_t>
inline void step_chunk(const StepCoefs& c, const float* x, const out_t* out, const out_t* uncond, float w, float s,
                       const float* z, int64_t len, float* xp) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    xp[i] = ddpm_step_value(c, x[i], step_output<guided>(out, uncond, w, i), z[i], clip, thresholded, s);
  }
}

// RePaint's blend over a chunk (fused_math.h's inpaint_value), on the step's values still in the
// stack buffer xp: the same pass, and the unblended loop above is today's.
inline void inpaint_chunk(const InpaintCoefs& c, const float* known, const float* mask, const float* z1, int64_t len,
                          float* xp) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) xp[i] = inpaint_value(c, mask[i], known[i], z1[i], xp[i]);
}

template <typename out_t>
void ddpm_step_impl(const StepArgs& a) {
  const int64_t seed = a.rng != nullptr ? a.rng[0] : a.seed;
  const int64_t sample_offset = a.rng != nullptr ? a.rng[1] : a.sample_offset;
  const PhiloxKey key = philox_key(seed);
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  const out_t* uncond_output = static_cast<const out_t*>(a.uncond_output);  // nullptr: unguided
  for_each_chunk(a.n, a.numel, [&](int64_t b, int64_t j, int64_t len) {
    const int64_t slot = row_value(a.step, b);
    const float* row = a.coefs + slot * a.coef_columns;
    const StepCoefs c = load_step_coefs(row);
    float z[kChunk];
    if (c.sigma != 0.0f) {
      normals(key, sample_word(sample_offset, b), static_cast<uint64_t>(slot * a.numel + j), len, z);
    } else {
      std::fill(z, z + len, 0.0f);  // sigma * z == 0 exactly: skip the noise
    }
    const float* x = a.x + b * a.numel + j;
    const out_t* out = model_output + b * a.numel + j;
    const out_t* uncond = uncond_output != nullptr ? uncond_output + b * a.numel + j : nullptr;
    float xp[kChunk];
    const float s = a.threshold != nullptr ? a.threshold[b] : 1.0f;
    dispatch_flags(a.clip_denoised, uncond != nullptr, a.threshold != nullptr, [&](auto clip, auto guided, auto th) {
      step_chunk<decltype(clip)::value, decltype(guided)::value, decltype(th)::value>(c, x, out, uncond,
                                                                                    a.guidance_scale, s, z, len, xp);
    });
    if (a.known != nullptr) {  // inpainting: the known image noised to the step's target where mask = 1
      const InpaintCoefs k = load_inpaint_coefs(row);
      float z1[kChunk];  // slot step + K + 1 (a.step.limit = K)
      if (k.kb != 0.0f) {
        normals(key, sample_word(sample_offset, b), static_cast<uint64_t>((slot + a.step.limit + 1) * a.numel + j),
                len, z1);
      } else {
        std::fill(z1, z1 + len, 0.0f);  // kb * z1 == 0 exactly (the last step): skip the noise
      }
      inpaint_chunk(k, a.known + b * a.numel + j, a.mask + b * a.numel + j, z1, len, xp);
    }
    std::copy(xp, xp + len, a.x_prev + b * a.numel + j);
    if (a.model_input != nullptr) {
      dispatch_float(a.model_input_dtype, [&](auto tag) { store_model_input<decltype(tag)>(a, b, j, len, xp); });
    }
  });
}

// The multistep formula over a chunk: x becomes x_next, h3 (ring slot step % 3) E, x_last x_corr.
template <bool clip, bool guided, bool thresholded, typename out_t>
inline void multistep_chunk(const MultistepCoefs& c, float* x, const out_t* out, const out_t* uncond, float w, float s,
                            float* x_last, const float* h1, const float* h2, float* h3, const float* z, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const MultistepValue v = multistep_value(c, x[i], step_output<guided>(out, uncond, w, i), x_last[i], h1[i], h2[i],
                                             h3[i], z[i], clip, thresholded, s);
    x[i] = v.x_next;
    h3[i] = v.e;
    x_last[i] = v.x_corr;
  }
}

template <typename out_t>
void multistep_step_impl(const MultistepArgs& a) {
  const int64_t step = row_value(a.step, 0);
  const MultistepCoefs c = load_multistep_coefs(a.table + step * kMultistepColumns);
  const int64_t total = a.n * a.numel;
  const RingSlots slot = ring_slots(step);  // H3 (three steps back) is read at slot step % 3, then overwritten
  const float* h1 = a.history + slot.h1 * total;
  const float* h2 = a.history + slot.h2 * total;
  float* h3 = a.history + slot.h3 * total;
  float* x_last = a.history + kHistoryRing * total;
  const PhiloxKey key = philox_key(a.rng[0]);
  const int64_t sample_offset = a.rng[1];
  const bool noisy = a.stochastic && c.cz != 0.0f;  // cz * z == 0 exactly otherwise: skip the noise
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  const out_t* uncond_output = static_cast<const out_t*>(a.uncond_output);  // nullptr: unguided
  for_each_chunk(a.n, a.numel, [&](int64_t b, int64_t j, int64_t len) {
    float z[kChunk];
    if (noisy) {
      normals(key, sample_word(sample_offset, b), static_cast<uint64_t>(step * a.numel + j), len, z);
    } else {
      std::fill(z, z + len, 0.0f);
    }
    const int64_t i = b * a.numel + j;
    const out_t* uncond = uncond_output != nullptr ? uncond_output + i : nullptr;
    const float s = a.threshold != nullptr ? a.threshold[b] : 1.0f;
    dispatch_flags(a.clip_denoised, uncond != nullptr, a.threshold != nullptr, [&](auto clip, auto guided, auto th) {
      multistep_chunk<decltype(clip)::value, decltype(guided)::value, decltype(th)::value>(
          c, a.x + i, model_output + i, uncond, a.guidance_scale, s, x_last + i, h1 + i, h2 + i, h3 + i, z, len);
    });
    if (a.model_input != nullptr) {  // x + i now holds x_next
      dispatch_float(a.model_input_dtype, [&](auto tag) { store_model_input<decltype(tag)>(a, b, j, len, a.x + i); });
    }
  });
}

template <typename out_t>
void loss_forward_impl(const LossArgs& a) {
  const PhiloxKey key = philox_key(a.seed);
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  const bool needs_x0 = a.prediction != kEpsilon;
  const int64_t parts = a.partials_per_row;
  at::parallel_for(0, a.n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts;
      const int64_t lo = (task - b * parts) * kLossBlock;
      const int64_t hi = std::min(a.numel, lo + kLossBlock);
      const int64_t t = row_value(a.t, b);
      const float sqrt_alphas_cumprod_t = a.sqrt_alphas_cumprod[t];
      const float sqrt_one_minus_alphas_cumprod_t = a.sqrt_one_minus_alphas_cumprod[t];
      double total = 0.0;
      for (int64_t j = lo; j < hi; j += kChunk) {
        const int64_t len = std::min(kChunk, hi - j);
        float z[kChunk];
        normals(key, sample_word(a.sample_offset, b), static_cast<uint64_t>(j), len, z);
        const out_t* out = model_output + b * a.numel + j;
        const float* x0 = a.x0 + b * a.numel + j;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; ++i) {
          const float x0v = needs_x0 ? x0[i] : 0.0f;
          const float d = to_float(out[i]) - training_target(a.prediction, sqrt_alphas_cumprod_t,
                                                             sqrt_one_minus_alphas_cumprod_t, x0v, z[i]);
          sum += elementwise_loss(a.loss_type, d, a.huber_delta);
        }
        total += sum;
      }
      a.partials[task] = static_cast<float>(total);
    }
  });
}

template <typename out_t>
void loss_backward_impl(const LossArgs& a) {
  const PhiloxKey key = philox_key(a.seed);
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  out_t* grad_out = static_cast<out_t*>(a.grad_model_output);
  const bool needs_x0 = a.prediction != kEpsilon;
  // autograd of mean_b(w[t_b] * mean_j(loss)): grad / n * w[t_b] / numel
  const float scale = *a.grad / static_cast<float>(a.n);
  const float inv_numel = 1.0f / static_cast<float>(a.numel);
  for_each_chunk(a.n, a.numel, [&](int64_t b, int64_t j, int64_t len) {
    const int64_t t = row_value(a.t, b);
    const float sqrt_alphas_cumprod_t = a.sqrt_alphas_cumprod[t];
    const float sqrt_one_minus_alphas_cumprod_t = a.sqrt_one_minus_alphas_cumprod[t];
    const float row_scale = scale * a.weights[t] * inv_numel;
    float z[kChunk];
    normals(key, sample_word(a.sample_offset, b), static_cast<uint64_t>(j), len, z);
    const out_t* out = model_output + b * a.numel + j;
    const float* x0 = a.x0 + b * a.numel + j;
    out_t* g = grad_out + b * a.numel + j;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float x0v = needs_x0 ? x0[i] : 0.0f;
      const float d = to_float(out[i]) - training_target(a.prediction, sqrt_alphas_cumprod_t,
                                                         sqrt_one_minus_alphas_cumprod_t, x0v, z[i]);
      g[i] = static_cast<out_t>(row_scale * elementwise_loss_grad(a.loss_type, d, a.huber_delta));
    }
  });
}

}  // namespace

void philox(const PhiloxArgs& a) {
  const PhiloxKey key = philox_key(a.seed);
  at::parallel_for(0, a.count, kGrain, [&](int64_t begin, int64_t end) {
    if (a.normals != nullptr) {
      for (int64_t j = begin; j < end; j += kChunk) normals_at(key, a.offsets + j, std::min(kChunk, end - j), a.normals + j);
    }
    if (a.words == nullptr) return;
    for (int64_t j = begin; j < end; ++j) {
      const uint64_t offset = static_cast<uint64_t>(a.offsets[j]);
      const PhiloxWords w = philox4x32_10(key.k0, key.k1, static_cast<uint32_t>(offset),
                                          static_cast<uint32_t>(offset >> 32));
      int64_t* out = a.words + 4 * j;
      out[0] = w.x0;
      out[1] = w.x1;
      out[2] = w.x2;
      out[3] = w.x3;
    }
  });
}

void q_sample(const QSampleArgs& a) {
  dispatch_float(a.x0_dtype, [&](auto tag) { q_sample_impl<decltype(tag)>(a); });
}

void ddpm_step(const StepArgs& a) {
  dispatch_float(a.model_output_dtype, [&](auto tag) { ddpm_step_impl<decltype(tag)>(a); });
}

void multistep_step(const MultistepArgs& a) {
  dispatch_float(a.model_output_dtype, [&](auto tag) { multistep_step_impl<decltype(tag)>(a); });
}

int64_t loss_partials_per_row(int64_t numel) {
  return std::max<int64_t>(1, (numel + kLossBlock - 1) / kLossBlock);
}

void diffusion_loss_forward(const LossArgs& a) {
  dispatch_float(a.model_output_dtype, [&](auto tag) { loss_forward_impl<decltype(tag)>(a); });
}

void diffusion_loss_backward(const LossArgs& a) {
  dispatch_float(a.model_output_dtype, [&](auto tag) { loss_backward_impl<decltype(tag)>(a); });
}

}  // namespace cpu
}  // namespace fastddpm

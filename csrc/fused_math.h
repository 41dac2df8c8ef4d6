// The math of every fused op, once, for the CPU and the CUDA implementations.
//
// Everything here is `__host__ __device__` inline and float32, so the C++
// loops (cpu_kernels.cpp) and the CUDA kernels (cuda_kernels.cu) compute the same
// expressions as fastddpm/ops/reference.py and fastddpm/noise.py:
//
//   * Philox4x32-10 (Salmon et al. 2011) exactly as Triton's `philox_impl`,
//     then `uint_to_uniform_float` and Box-Muller as `tl.randn`: the integers
//     are bit-exact on every backend, the normals agree to a few ulp.
//   * the noise offset of element j of batch row b:
//       ((sample_offset + b) << 32) | (slot * numel + j)
//   * classifier-free guidance  out = u + w * (c - u)  (reference.guided_output)
//   * dynamic thresholding  x0 = clamp(x0_hat, -s, s) / s  (reference.predict_x0)
//   * the reverse step  x_prev = c0 * clip?(a * x + b * out) + c1 * x + sigma * z
//   * the inpainting blend  x_prev = m * (ka * known + kb * z1) + (1 - m) * x_prev  (reference.inpaint_blend)
//   * the multistep solver update (reference.multistep_step): one row of fourteen coefficients
//   * q_sample, the training target and the elementwise losses + gradients.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FDDPM_HD __host__ __device__ __forceinline__
#else
#define FDDPM_HD inline
#endif

#if defined(__CUDACC__)
#define FDDPM_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define FDDPM_UNROLL _Pragma("GCC unroll 10")
#else
#define FDDPM_UNROLL
#endif

namespace fastddpm {

// -- noise: Philox4x32-10 + Box-Muller (fastddpm/noise.py) -------------------------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Triton's scale for 32-bit words: the largest float with INT32_MAX * scale < 1.
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kU1Min = 1.0e-7f;

FDDPM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of the counter (c0, c1, 0, 0) under the key (k0, k1): four words.
struct PhiloxWords {
  uint32_t x0, x1, x2, x3;
};

FDDPM_HD PhiloxWords philox4x32_10(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
  uint32_t c2 = 0, c3 = 0;
  FDDPM_UNROLL
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxWords{c0, c1, c2, c3};
}

// `uint_to_uniform_float`: bitcast to int32, fold negatives with ~x, scale.
FDDPM_HD float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i = i < 0 ? ~i : i;
  return static_cast<float>(i) * kUniformScale;
}

// Box-Muller on two Philox words, in the reference's float32 operation order.
FDDPM_HD float box_muller(uint32_t i1, uint32_t i2) {
  float u1 = uint_to_uniform(i1);
  u1 = u1 < kU1Min ? kU1Min : u1;
  const float th = kTwoPi * uint_to_uniform(i2);
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

// The 64-bit counter of element j of global sample `sample` in noise `slot`.
FDDPM_HD uint64_t noise_offset(int64_t sample, int64_t slot, int64_t numel, int64_t j) {
  return (static_cast<uint64_t>(sample) << 32) | static_cast<uint64_t>(slot * numel + j);
}

// The key of a 64-bit seed: low word k0, high word k1.
struct PhiloxKey {
  uint32_t k0, k1;
};

FDDPM_HD PhiloxKey philox_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return PhiloxKey{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

// normal(seed, offset): low word of the offset is counter c0, high word c1.
FDDPM_HD float philox_normal(PhiloxKey key, uint64_t offset) {
  const PhiloxWords w = philox4x32_10(key.k0, key.k1, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  return box_muller(w.x0, w.x1);  // Box-Muller uses the first two words
}

// -- classifier-free guidance (reference.guided_output; Ho & Salimans 2022) -----------------
// The output a step uses: u + w (c - u), c the conditional output, u the unconditional one,
// w the guidance scale (1: c alone), in the reference's float32 operation order.  The kernels
// call it only in their guided instantiation (a template flag): the unguided loop is unchanged.
FDDPM_HD float guided_value(float c, float u, float w) { return u + w * (c - u); }

// -- reverse step (reference.ddpm_step) -----------------------------------------------
// c2 weights the raw (guided) model output (diffusers' DDIM with clip_sample: the direction from the
// unclipped output); 0 in every other table, where the term is skipped (a select, not + 0 * out, so an
// inf or NaN output the clip bounds today stays bounded: c2 = 0 is the five-column step bit for bit).
constexpr int kCoefColumns = 6;  // (a, b, c0, c1, sigma, c2) (reference.COEF_COLUMNS)

struct StepCoefs {
  float a, b, c0, c1, sigma, c2;
};

FDDPM_HD StepCoefs load_step_coefs(const float* row) {
  return StepCoefs{row[0], row[1], row[2], row[3], row[4], row[5]};
}

FDDPM_HD float clamp_unit(float v) {
  // comparisons, not fminf/fmaxf, so a NaN propagates as torch.clamp does;
  // two selects (min/max instructions), not nested ones, so CPU loops vectorise
  v = v < -1.0f ? -1.0f : v;
  return v > 1.0f ? 1.0f : v;
}

// -- dynamic thresholding (reference.predict_x0; Saharia et al. 2022, diffusers' _threshold_sample) --
// x0 = clamp(x0_hat, -s, s) / s with the sample's bound s (reference.dynamic_threshold: >= 1;
// s = 1 is the plain clip), clamped by comparisons as clamp_unit, then a true division as torch's.
FDDPM_HD float threshold_value(float x0_hat, float s) {
  float v = x0_hat < -s ? -s : x0_hat;
  v = v > s ? s : v;
  return v / s;
}

// The x0 prediction a step uses: thresholded by s (in place of the clip, whatever clip says), or
// clamped to [-1, 1] if clip, or x0_hat.  Callers pass `thresholded` as a compile-time constant
// (a template flag), so the unthresholded instantiations are the plain clip's code.
FDDPM_HD float denoised_value(float x0_hat, bool clip, bool thresholded, float s) {
  if (thresholded) return threshold_value(x0_hat, s);
  return clip ? clamp_unit(x0_hat) : x0_hat;
}

// x0_hat = a x + b out (thresholded by s, or clamped to [-1, 1] if clip);
// x_prev = c0 x0_hat + c1 x + c2 out + sigma z, summed left to right as the reference (c2 = 0: no c2 term)
FDDPM_HD float ddpm_step_value(const StepCoefs& c, float x, float out, float z, bool clip, bool thresholded = false,
                               float s = 1.0f) {
  const float x0_hat = denoised_value(c.a * x + c.b * out, clip, thresholded, s);
  float v = c.c0 * x0_hat + c.c1 * x;
  v = c.c2 != 0.0f ? v + c.c2 * out : v;
  return v + c.sigma * z;
}

// -- inpainting (reference.inpaint_blend; RePaint, Lugmayr et al. 2022, Eq. 8-10) -------------
// With known/mask the step's row has two more columns, (ka, kb) = (sqrt(abar_prev), sqrt(1 - abar_prev)):
// the known image forward-noised to the step's target level.  Its noise z1 is slot step + K + 1.
constexpr int kInpaintColumns = 8;  // (a, b, c0, c1, sigma, c2, ka, kb) (reference.INPAINT_COEF_COLUMNS)

struct InpaintCoefs {
  float ka, kb;
};

FDDPM_HD InpaintCoefs load_inpaint_coefs(const float* row) { return InpaintCoefs{row[6], row[7]}; }

// m * (ka known + kb z1) + (1 - m) step, in the reference's operation order: m = 1, ka = 1, kb = 0
// gives known bit for bit (0 * step = 0), m = 0 the step's value bit for bit.
FDDPM_HD float inpaint_value(const InpaintCoefs& c, float m, float known, float z1, float step) {
  return m * (c.ka * known + c.kb * z1) + (1.0f - m) * step;
}

// -- multistep solver update (reference.multistep_step, fastddpm/multistep.py) ------------
constexpr int kMultistepColumns = 14;  // multistep.TABLE_COLUMNS (reference.MULTISTEP_WIDTH)
constexpr int kHistoryRing = 3;        // the last three stored predictions E, slot step % 3
constexpr int kHistorySlots = 4;       // the ring and x_last (reference.MULTISTEP_HISTORY_SLOTS)

struct MultistepCoefs {
  float a, b, u, cl, k0, k1, k2, cx, p0, p1, p2, cz, p3, hx;
};

FDDPM_HD MultistepCoefs load_multistep_coefs(const float* r) {
  return MultistepCoefs{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13]};
}

// The ring slots of a step (the step index counts down, so step + 1 is the previous call): H1, H2,
// H3 are read from the E of one, two and three calls back; E is then written over H3's slot.
struct RingSlots {
  int64_t h1, h2, h3;
};

FDDPM_HD RingSlots ring_slots(int64_t step) {
  return RingSlots{(step + 1) % kHistoryRing, (step + 2) % kHistoryRing, step % kHistoryRing};
}

// What one element writes: x_next into x, e into the ring slot step % 3, x_corr into slot 3.
struct MultistepValue {
  float x_next, e, x_corr;
};

// D = clip?(a x + b out) (or thresholded by s, as ddpm_step_value); E = D + hx x (what the ring keeps);
// x_corr = u x + cl x_last + k0 D + k1 H1 + k2 H2 (UniPC's corrector); x_next = cx x_corr + p0 D + p1 H1
// + p2 H2 + p3 H3 + cz z, summed left to right as the reference (p3 = hx = 0 adds exact zeros).
FDDPM_HD MultistepValue multistep_value(const MultistepCoefs& c, float x, float out, float x_last, float h1,
                                        float h2, float h3, float z, bool clip, bool thresholded = false,
                                        float s = 1.0f) {
  const float d = denoised_value(c.a * x + c.b * out, clip, thresholded, s);
  const float x_corr = c.u * x + c.cl * x_last + c.k0 * d + c.k1 * h1 + c.k2 * h2;
  const float x_next = c.cx * x_corr + c.p0 * d + c.p1 * h1 + c.p2 * h2 + c.p3 * h3 + c.cz * z;
  return MultistepValue{x_next, d + c.hx * x, x_corr};
}

// -- forward process and training (reference.q_sample / diffusion_loss) --------------
// A table's value at a sample's timestep is the table's name + _t: sqrt_alphas_cumprod_t = sqrt_alphas_cumprod[t].
// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. Eq. 4)
FDDPM_HD float q_sample_value(float sqrt_alphas_cumprod_t, float sqrt_one_minus_alphas_cumprod_t, float x0, float eps) {
  return sqrt_alphas_cumprod_t * x0 + sqrt_one_minus_alphas_cumprod_t * eps;
}

enum Prediction : int { kEpsilon = 0, kX0 = 1, kV = 2 };
enum LossType : int { kL2 = 0, kL1 = 1, kHuber = 2 };

// eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
FDDPM_HD float training_target(int prediction, float sqrt_alphas_cumprod_t, float sqrt_one_minus_alphas_cumprod_t,
                               float x0, float eps) {
  if (prediction == kEpsilon) return eps;
  if (prediction == kX0) return x0;
  return sqrt_alphas_cumprod_t * eps - sqrt_one_minus_alphas_cumprod_t * x0;
}

// Elementwise loss of d = output - target, as F.mse_loss / l1_loss / huber_loss.
FDDPM_HD float elementwise_loss(int loss_type, float d, float delta) {
  if (loss_type == kL2) return d * d;
  const float ad = fabsf(d);
  if (loss_type == kL1) return ad;
  return ad < delta ? 0.5f * d * d : delta * (ad - 0.5f * delta);
}

// d(loss)/d(output), as the autograd formulas of those three losses.
FDDPM_HD float elementwise_loss_grad(int loss_type, float d, float delta) {
  if (loss_type == kL2) return 2.0f * d;
  if (loss_type == kL1) return static_cast<float>((d > 0.0f) - (d < 0.0f));
  return d < -delta ? -delta : (d > delta ? delta : d);
}

}  // namespace fastddpm

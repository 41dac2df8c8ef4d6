// Plain-pointer arguments of the fused kernels, shared by the host API
// (ops.cpp), the CPU loops (cpu_kernels.cpp) and the CUDA kernels
// (cuda_kernels.cu).  No torch headers here, so the CUDA translation unit
// compiles without them (fast nvcc builds).
//
// Every tensor is contiguous, batch-major: row b of a tensor with `numel`
// elements per sample starts at b * numel.  A per-row index (t or step) is read
// as index[b * stride]: stride 1 for one value per sample, stride 0 for a
// single value shared by the batch (e.g. a step counter held in a device
// tensor, so the op can sit inside a CUDA graph).
#pragma once

#include <stdint.h>

namespace fastddpm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RowIndex {
  const int64_t* data;
  int64_t stride;  // 0: broadcast data[0]; 1: one per row
  int64_t limit;   // valid values are [0, limit)
};

struct PhiloxArgs {
  int64_t seed;
  const int64_t* offsets;
  int64_t count;
  float* normals;   // normal(seed, offsets), or nullptr
  int64_t* words;   // the four Philox words of each offset ([count, 4]), or nullptr
};

struct QSampleArgs {
  const void* x0;
  DType x0_dtype;
  RowIndex t;
  const float* sqrt_alphas_cumprod;
  const float* sqrt_one_minus_alphas_cumprod;
  int64_t seed;
  int64_t sample_offset;
  int64_t n;
  int64_t numel;
  float* x_t;
};

struct StepArgs {
  const float* x;
  const void* model_output;
  DType model_output_dtype;
  // classifier-free guidance: the unconditional output (model_output's dtype, contiguous), or
  // nullptr: the step uses u + guidance_scale * (c - u) in place of model_output
  const void* uncond_output;
  float guidance_scale;
  // dynamic thresholding: float32 [n], the bound s_b of each sample (x0 = clamp(x0_hat, -s_b, s_b) / s_b
  // in place of the clip), or nullptr: none
  const float* threshold;
  // inpainting (RePaint): known (the image to keep) and mask (1 = keep), float32 [n, numel] contiguous, or
  // both nullptr: none.  Given, coefs has kInpaintColumns (ka, kb last) and x_prev = mask * (ka * known +
  // kb * z1) + (1 - mask) * x_prev, z1 the normal of slot step + step.limit + 1 (step.limit = K)
  const float* known;
  const float* mask;
  RowIndex step;        // row of coefs and noise slot
  const float* coefs;   // [K, 6]: (a, b, c0, c1, sigma, c2), or [K, 8] with known: (..., ka, kb)
  int64_t coef_columns; // 6, or 8 with known
  int64_t seed;
  int64_t sample_offset;
  // (seed, sample_offset) in memory on the op's device, read by the kernel in place of the
  // two values above (ddpm_step_: a captured CUDA graph replays with whatever it holds), or nullptr
  const int64_t* rng;
  bool clip_denoised;
  int64_t n;
  int64_t numel;
  float* x_prev;        // may alias x (in-place step)
  void* model_input;    // optional low-precision copy of x_prev, or nullptr
  DType model_input_dtype;
  bool channels_last;   // model_input is [n, C, H, W] in channels_last order
  int64_t channels;     // C
  int64_t spatial;      // H * W
};

// multistep_step_: x <- x_next and the history ring advanced, in place (and model_input, if given).
struct MultistepArgs {
  float* x;             // [n, numel]: read, then overwritten with x_next
  const void* model_output;
  DType model_output_dtype;
  const void* uncond_output;  // as StepArgs': the guidance's unconditional output, or nullptr
  float guidance_scale;
  const float* threshold;     // as StepArgs': float32 [n] per-sample bounds of D, or nullptr
  float* history;       // [4, n, numel]: slot step % 3 <- E, slot 3 <- x_corr
  RowIndex step;        // one value for the batch (stride 0): row of table and noise slot
  const float* table;   // [K, 14] (multistep.TABLE_COLUMNS)
  const int64_t* rng;   // (seed, sample_offset) on the op's device
  bool clip_denoised;
  bool stochastic;      // add cz * z (the SDE solver)
  int64_t n;
  int64_t numel;
  // as StepArgs': the optional low-precision copy of x_next (the next model call's input)
  void* model_input;    // or nullptr
  DType model_input_dtype;
  bool channels_last;   // model_input is [n, C, H, W] in channels_last order
  int64_t channels;     // C
  int64_t spatial;      // H * W
};

struct LossArgs {
  const void* model_output;
  DType model_output_dtype;
  const float* x0;
  RowIndex t;
  const float* sqrt_alphas_cumprod;
  const float* sqrt_one_minus_alphas_cumprod;
  const float* weights;
  int64_t seed;
  int64_t sample_offset;
  int64_t n;
  int64_t numel;
  int prediction;       // Prediction
  int loss_type;        // LossType
  float huber_delta;
  // forward: per-row partial sums of the elementwise loss, [n, partials_per_row]
  float* partials;
  int64_t partials_per_row;
  // backward: d loss / d model_output = grad * weights[t_b] / (n * numel) * loss'(d)
  const float* grad;    // 0-dim upstream gradient
  void* grad_model_output;
};

// CPU loops (cpu_kernels.cpp).
namespace cpu {
void philox(const PhiloxArgs& args);
void q_sample(const QSampleArgs& args);
void ddpm_step(const StepArgs& args);
void multistep_step(const MultistepArgs& args);
int64_t loss_partials_per_row(int64_t numel);
void diffusion_loss_forward(const LossArgs& args);
void diffusion_loss_backward(const LossArgs& args);
}  // namespace cpu

}  // namespace fastddpm

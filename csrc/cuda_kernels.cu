// CUDA implementation of the fused ops: grid-stride loops over packs of
// kVec elements (16-byte loads of float32, 8-byte loads of 16-bit types) when
// every row is a whole number of packs and the pointers are aligned, one
// element per iteration otherwise.  The noise is generated in the kernel
// (fused_math.h), so the only memory traffic is the ops' inputs and outputs.
//
// No torch headers: this file compiles with nvcc alone, quickly.  Values that
// would need a device sync to check on the host (t and step indices, the noise
// key of ddpm_step_) are checked here; an out-of-range value traps, like a
// device-side assert.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "cuda_kernels.h"
#include "fused_math.h"

namespace fastddpm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kBlocksPerSm = 8;
constexpr int64_t kLossElementsPerBlock = 8192;
constexpr int64_t kMaxLossBlocksPerRow = 64;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

__device__ __forceinline__ int64_t row_value(const RowIndex& index, int64_t b) {
  const int64_t v = index.data[b * index.stride];
  if (v < 0 || v >= index.limit) __trap();  // t / step out of the table's range
  return v;
}

__device__ __forceinline__ uint64_t sample_word(int64_t sample_offset, int64_t b) {
  return static_cast<uint64_t>(sample_offset + b) << 32;
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t thread_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename Fn>
void dispatch_float(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
  }
}

int grid_size(int64_t work_items, int num_sms) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{num_sms} * kBlocksPerSm)));
}

template <typename T>
bool aligned(const void* p, int n) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * n) == 0;
}

// -- philox: the noise contract alone --------------------------------------------------
__global__ void __launch_bounds__(kThreads) philox_kernel(PhiloxArgs a) {
  const PhiloxKey key = philox_key(a.seed);
  for (int64_t i = thread_index(); i < a.count; i += thread_count()) {
    const uint64_t offset = static_cast<uint64_t>(a.offsets[i]);
    const PhiloxWords w = philox4x32_10(key.k0, key.k1, static_cast<uint32_t>(offset),
                                        static_cast<uint32_t>(offset >> 32));
    if (a.normals != nullptr) a.normals[i] = box_muller(w.x0, w.x1);
    if (a.words != nullptr) {
      a.words[4 * i + 0] = w.x0;
      a.words[4 * i + 1] = w.x1;
      a.words[4 * i + 2] = w.x2;
      a.words[4 * i + 3] = w.x3;
    }
  }
}

// -- q_sample -----------------------------------------------------------------------
template <int N, typename x0_t>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(QSampleArgs a) {
  const PhiloxKey key = philox_key(a.seed);
  const x0_t* x0 = static_cast<const x0_t*>(a.x0);
  const int64_t packs = a.n * a.numel / N;
  for (int64_t p = thread_index(); p < packs; p += thread_count()) {
    const int64_t i = p * N;
    const int64_t b = i / a.numel;
    const int64_t j = i - b * a.numel;
    const int64_t t = row_value(a.t, b);
    const float sqrt_alphas_cumprod_t = a.sqrt_alphas_cumprod[t];
    const float sqrt_one_minus_alphas_cumprod_t = a.sqrt_one_minus_alphas_cumprod[t];
    const uint64_t hi = sample_word(a.sample_offset, b);
    const Pack<x0_t, N> x = load_pack<N>(x0 + i);
    Pack<float, N> y;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float eps = philox_normal(key, hi | static_cast<uint64_t>(j + k));  // slot 0
      y.v[k] = q_sample_value(sqrt_alphas_cumprod_t, sqrt_one_minus_alphas_cumprod_t, to_float(x.v[k]), eps);
    }
    store_pack<N>(a.x_t + i, y);
  }
}

// -- ddpm_step ----------------------------------------------------------------------
// Args: StepArgs or MultistepArgs (the same model_input fields).
template <typename in_t, int N, typename Args>
__device__ __forceinline__ void store_model_input_as(const Args& a, int64_t b, int64_t j, const Pack<float, N>& y) {
  in_t* dst = static_cast<in_t*>(a.model_input) + b * a.numel;
  if (!a.channels_last) {
    Pack<in_t, N> q;
#pragma unroll
    for (int k = 0; k < N; ++k) q.v[k] = from_float<in_t>(y.v[k]);
    store_pack<N>(dst + j, q);
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {  // element c * HW + s of the row goes to s * C + c
    const int64_t c = (j + k) / a.spatial;
    const int64_t s = j + k - c * a.spatial;
    dst[s * a.channels + c] = from_float<in_t>(y.v[k]);
  }
}

template <int N, typename Args>
__device__ __forceinline__ void store_model_input(const Args& a, int64_t b, int64_t j, const Pack<float, N>& y) {
  switch (a.model_input_dtype) {
    case DType::kFloat32: store_model_input_as<float>(a, b, j, y); break;
    case DType::kFloat16: store_model_input_as<__half>(a, b, j, y); break;
    case DType::kBFloat16: store_model_input_as<__nv_bfloat16>(a, b, j, y); break;
  }
}

// The model output a step uses: c, or with guidance u + w (c - u) (fused_math.h); `guided` is a
// template argument, so the unguided kernel neither loads uncond nor branches on it.
template <bool guided, int N, typename out_t>
__device__ __forceinline__ float step_output(const Pack<out_t, N>& out, const Pack<out_t, N>& uncond, float w, int k) {
  const float c = to_float(out.v[k]);
  return guided ? guided_value(c, to_float(uncond.v[k]), w) : c;
}

template <bool guided, int N, typename out_t>
__device__ __forceinline__ Pack<out_t, N> load_uncond(const void* uncond_output, int64_t i) {
  Pack<out_t, N> u{};
  if (guided) u = load_pack<N>(static_cast<const out_t*>(uncond_output) + i);
  return u;
}

// The bound of row b (dynamic thresholding), read only in the thresholded instantiation.
template <bool thresholded>
__device__ __forceinline__ float row_threshold(const float* threshold, int64_t b) {
  return thresholded ? threshold[b] : 1.0f;
}

// A pack of the inpainting blend's known image or mask, read only in the blended instantiation.
template <bool blended, int N>
__device__ __forceinline__ Pack<float, N> load_blend_input(const float* p, int64_t i) {
  Pack<float, N> v{};
  if (blended) v = load_pack<N>(p + i);
  return v;
}

template <int N, typename out_t, bool guided, bool thresholded, bool blended>
__global__ void __launch_bounds__(kThreads) ddpm_step_kernel(StepArgs a) {
  // the noise key from device memory (ddpm_step_, graph replays) or the launch arguments
  const int64_t seed = a.rng != nullptr ? a.rng[0] : a.seed;
  const int64_t sample_offset = a.rng != nullptr ? a.rng[1] : a.sample_offset;
  if (seed < 0 || sample_offset < 0) __trap();  // the host checks only the launch arguments
  const PhiloxKey key = philox_key(seed);
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  const int64_t packs = a.n * a.numel / N;
  for (int64_t p = thread_index(); p < packs; p += thread_count()) {
    const int64_t i = p * N;
    const int64_t b = i / a.numel;
    const int64_t j = i - b * a.numel;
    const int64_t slot = row_value(a.step, b);
    const float* row = a.coefs + slot * (blended ? kInpaintColumns : kCoefColumns);
    const StepCoefs c = load_step_coefs(row);
    const uint64_t hi = sample_word(sample_offset, b);
    const Pack<float, N> x = load_pack<N>(a.x + i);
    const Pack<out_t, N> out = load_pack<N>(model_output + i);
    const Pack<out_t, N> uncond = load_uncond<guided, N, out_t>(a.uncond_output, i);
    const float s = row_threshold<thresholded>(a.threshold, b);  // a pack lies within one row
    // inpainting: the known image noised to the step's target where mask = 1; z1 is slot step + K + 1
    const InpaintCoefs kc = blended ? load_inpaint_coefs(row) : InpaintCoefs{0.0f, 0.0f};
    const Pack<float, N> known = load_blend_input<blended, N>(a.known, i);
    const Pack<float, N> mask = load_blend_input<blended, N>(a.mask, i);
    const int64_t known_slot = slot + a.step.limit + 1;  // a.step.limit = K
    Pack<float, N> y;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // sigma * z == 0 exactly when sigma == 0 (DDIM eta=0, the last step): skip the noise
      const float z = c.sigma != 0.0f ? philox_normal(key, hi | static_cast<uint64_t>(slot * a.numel + j + k)) : 0.0f;
      y.v[k] = ddpm_step_value(c, x.v[k], step_output<guided>(out, uncond, a.guidance_scale, k), z, a.clip_denoised,
                               thresholded, s);
      if (blended) {  // kb * z1 == 0 exactly when kb == 0 (the last step): skip the noise
        const float z1 =
            kc.kb != 0.0f ? philox_normal(key, hi | static_cast<uint64_t>(known_slot * a.numel + j + k)) : 0.0f;
        y.v[k] = inpaint_value(kc, mask.v[k], known.v[k], z1, y.v[k]);
      }
    }
    store_pack<N>(a.x_prev + i, y);
    if (a.model_input != nullptr) store_model_input<N>(a, b, j, y);
  }
}

// -- multistep_step_ -----------------------------------------------------------------
// In place: x <- x_next, history[step % 3] <- E, history[3] <- x_corr, model_input (if any) <- x_next
// in its dtype and layout.  Every element reads its own x / history values before writing them, so
// packs never race.
template <int N, typename out_t, bool guided, bool thresholded>
__global__ void __launch_bounds__(kThreads) multistep_step_kernel(MultistepArgs a) {
  const int64_t seed = a.rng[0];
  const int64_t sample_offset = a.rng[1];
  if (seed < 0 || sample_offset < 0) __trap();  // the host cannot read a device key without a sync
  const PhiloxKey key = philox_key(seed);
  const int64_t step = row_value(a.step, 0);
  const MultistepCoefs c = load_multistep_coefs(a.table + step * kMultistepColumns);
  const int64_t total = a.n * a.numel;
  const RingSlots slot = ring_slots(step);  // H3's slot step % 3 is read, then E overwrites it
  const float* h1_base = a.history + slot.h1 * total;
  const float* h2_base = a.history + slot.h2 * total;
  float* h3_base = a.history + slot.h3 * total;
  float* x_last_base = a.history + kHistoryRing * total;
  const bool noisy = a.stochastic && c.cz != 0.0f;  // cz * z == 0 exactly otherwise: skip the noise
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  const int64_t packs = total / N;
  for (int64_t p = thread_index(); p < packs; p += thread_count()) {
    const int64_t i = p * N;
    const int64_t b = i / a.numel;
    const int64_t j = i - b * a.numel;
    const uint64_t hi = sample_word(sample_offset, b);
    const Pack<float, N> x = load_pack<N>(a.x + i);
    const Pack<out_t, N> out = load_pack<N>(model_output + i);
    const Pack<out_t, N> uncond = load_uncond<guided, N, out_t>(a.uncond_output, i);
    const Pack<float, N> x_last = load_pack<N>(x_last_base + i);
    const Pack<float, N> h1 = load_pack<N>(h1_base + i);
    const Pack<float, N> h2 = load_pack<N>(h2_base + i);
    const Pack<float, N> h3 = load_pack<N>(h3_base + i);
    const float s = row_threshold<thresholded>(a.threshold, b);
    Pack<float, N> x_next, e, x_corr;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float z = noisy ? philox_normal(key, hi | static_cast<uint64_t>(step * a.numel + j + k)) : 0.0f;
      const MultistepValue v = multistep_value(c, x.v[k], step_output<guided>(out, uncond, a.guidance_scale, k),
                                               x_last.v[k], h1.v[k], h2.v[k], h3.v[k], z, a.clip_denoised,
                                               thresholded, s);
      x_next.v[k] = v.x_next;
      e.v[k] = v.e;
      x_corr.v[k] = v.x_corr;
    }
    store_pack<N>(a.x + i, x_next);
    store_pack<N>(h3_base + i, e);
    store_pack<N>(x_last_base + i, x_corr);
    if (a.model_input != nullptr) store_model_input<N>(a, b, j, x_next);
  }
}

// -- diffusion_loss -----------------------------------------------------------------
struct LossRow {
  float sqrt_alphas_cumprod_t, sqrt_one_minus_alphas_cumprod_t, weight;
  uint64_t hi;
};

__device__ __forceinline__ LossRow loss_row(const LossArgs& a, int64_t b) {
  const int64_t t = row_value(a.t, b);
  return LossRow{a.sqrt_alphas_cumprod[t], a.sqrt_one_minus_alphas_cumprod[t], a.weights[t],
                 sample_word(a.sample_offset, b)};
}

// d = output - target for element j of a row, the noise regenerated (slot 0).
__device__ __forceinline__ float loss_diff(const LossArgs& a, const PhiloxKey& key, const LossRow& r, int64_t j,
                                           float out, float x0) {
  const float eps = philox_normal(key, r.hi | static_cast<uint64_t>(j));
  return out - training_target(a.prediction, r.sqrt_alphas_cumprod_t, r.sqrt_one_minus_alphas_cumprod_t, x0, eps);
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// grid (partials_per_row, n): block x of row b sums its strided share of the
// row's elementwise loss into partials[b, x] (deterministic: no atomics).
template <int N, typename out_t>
__global__ void __launch_bounds__(kThreads) loss_forward_kernel(LossArgs a) {
  const PhiloxKey key = philox_key(a.seed);
  const int64_t b = blockIdx.y;
  const LossRow r = loss_row(a, b);
  const bool needs_x0 = a.prediction != kEpsilon;
  const out_t* out_row = static_cast<const out_t*>(a.model_output) + b * a.numel;
  const float* x0_row = a.x0 + b * a.numel;
  float sum = 0.0f;
  for (int64_t j = thread_index() * N; j < a.numel; j += thread_count() * N) {
    const Pack<out_t, N> out = load_pack<N>(out_row + j);
    Pack<float, N> x0{};
    if (needs_x0) x0 = load_pack<N>(x0_row + j);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float d = loss_diff(a, key, r, j + k, to_float(out.v[k]), x0.v[k]);
      sum += elementwise_loss(a.loss_type, d, a.huber_delta);
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) a.partials[b * a.partials_per_row + blockIdx.x] = sum;
}

template <int N, typename out_t>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(LossArgs a) {
  const PhiloxKey key = philox_key(a.seed);
  const out_t* model_output = static_cast<const out_t*>(a.model_output);
  out_t* grad_out = static_cast<out_t*>(a.grad_model_output);
  const bool needs_x0 = a.prediction != kEpsilon;
  // autograd of mean_b(w[t_b] * mean_j(loss)): grad / n * w[t_b] / numel
  const float scale = *a.grad / static_cast<float>(a.n);
  const float inv_numel = 1.0f / static_cast<float>(a.numel);
  const int64_t packs = a.n * a.numel / N;
  for (int64_t p = thread_index(); p < packs; p += thread_count()) {
    const int64_t i = p * N;
    const int64_t b = i / a.numel;
    const int64_t j = i - b * a.numel;
    const LossRow r = loss_row(a, b);
    const float row_scale = scale * r.weight * inv_numel;
    const Pack<out_t, N> out = load_pack<N>(model_output + i);
    Pack<float, N> x0{};
    if (needs_x0) x0 = load_pack<N>(a.x0 + i);
    Pack<out_t, N> g;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float d = loss_diff(a, key, r, j + k, to_float(out.v[k]), x0.v[k]);
      g.v[k] = from_float<out_t>(row_scale * elementwise_loss_grad(a.loss_type, d, a.huber_delta));
    }
    store_pack<N>(grad_out + i, g);
  }
}

// The optional model-input copy of the in-place steps takes the vector path only when it is
// contiguous and aligned to a pack (a channels_last copy is scattered element by element, so its
// alignment does not matter).
template <typename Args>
bool model_input_aligned(const Args& a) {
  bool ok = true;
  if (a.model_input != nullptr && !a.channels_last) {
    dispatch_float(a.model_input_dtype, [&](auto tag) { ok = aligned<decltype(tag)>(a.model_input, kVec); });
  }
  return ok;
}

// fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a compile-time constant.
template <typename Fn>
void dispatch_bool(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Launch `launch(guided, thresholded)` with the guidance and thresholding flags compile-time
// constants (std::true_type / false_type): the unguided, unthresholded kernel is today's.
template <typename Fn>
void dispatch_flags(const void* uncond_output, const float* threshold, const Fn& launch) {
  dispatch_bool(uncond_output != nullptr, [&](auto guided) {
    dispatch_bool(threshold != nullptr, [&](auto thresholded) { launch(guided, thresholded); });
  });
}

}  // namespace

cudaError_t philox(const PhiloxArgs& a, int num_sms, cudaStream_t stream) {
  if (a.count == 0) return cudaSuccess;
  philox_kernel<<<grid_size(a.count, num_sms), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t q_sample(const QSampleArgs& a, int num_sms, cudaStream_t stream) {
  const int64_t total = a.n * a.numel;
  if (total == 0) return cudaSuccess;
  dispatch_float(a.x0_dtype, [&](auto tag) {
    using x0_t = decltype(tag);
    if (a.numel % kVec == 0 && aligned<x0_t>(a.x0, kVec) && aligned<float>(a.x_t, kVec)) {
      q_sample_kernel<kVec, x0_t><<<grid_size(total / kVec, num_sms), kThreads, 0, stream>>>(a);
    } else {
      q_sample_kernel<1, x0_t><<<grid_size(total, num_sms), kThreads, 0, stream>>>(a);
    }
  });
  return cudaGetLastError();
}

cudaError_t ddpm_step(const StepArgs& a, int num_sms, cudaStream_t stream) {
  const int64_t total = a.n * a.numel;
  if (total == 0) return cudaSuccess;
  const bool input_aligned = model_input_aligned(a);
  dispatch_float(a.model_output_dtype, [&](auto tag) {
    using out_t = decltype(tag);
    const bool uncond_aligned = a.uncond_output == nullptr || aligned<out_t>(a.uncond_output, kVec);
    const bool blend_aligned = a.known == nullptr || (aligned<float>(a.known, kVec) && aligned<float>(a.mask, kVec));
    const bool vec = a.numel % kVec == 0 && input_aligned && uncond_aligned && blend_aligned &&
                     aligned<float>(a.x, kVec) && aligned<float>(a.x_prev, kVec) &&
                     aligned<out_t>(a.model_output, kVec);
    dispatch_flags(a.uncond_output, a.threshold, [&](auto guided, auto thresholded) {
      // the inpainting blend a third flag: the unblended kernels are today's
      dispatch_bool(a.known != nullptr, [&](auto blended) {
        constexpr bool kGuided = decltype(guided)::value;
        constexpr bool kThresholded = decltype(thresholded)::value;
        constexpr bool kBlended = decltype(blended)::value;
        if (vec) {
          ddpm_step_kernel<kVec, out_t, kGuided, kThresholded, kBlended>
              <<<grid_size(total / kVec, num_sms), kThreads, 0, stream>>>(a);
        } else {
          ddpm_step_kernel<1, out_t, kGuided, kThresholded, kBlended>
              <<<grid_size(total, num_sms), kThreads, 0, stream>>>(a);
        }
      });
    });
  });
  return cudaGetLastError();
}

cudaError_t multistep_step(const MultistepArgs& a, int num_sms, cudaStream_t stream) {
  const int64_t total = a.n * a.numel;
  if (total == 0) return cudaSuccess;
  const bool input_aligned = model_input_aligned(a);
  dispatch_float(a.model_output_dtype, [&](auto tag) {
    using out_t = decltype(tag);
    // the ring slots start at multiples of total = n * numel: aligned when numel is a whole number of packs
    const bool uncond_aligned = a.uncond_output == nullptr || aligned<out_t>(a.uncond_output, kVec);
    const bool vec = a.numel % kVec == 0 && input_aligned && uncond_aligned && aligned<float>(a.x, kVec) &&
                     aligned<float>(a.history, kVec) && aligned<out_t>(a.model_output, kVec);
    dispatch_flags(a.uncond_output, a.threshold, [&](auto guided, auto thresholded) {
      constexpr bool kGuided = decltype(guided)::value;
      constexpr bool kThresholded = decltype(thresholded)::value;
      if (vec) {
        multistep_step_kernel<kVec, out_t, kGuided, kThresholded>
            <<<grid_size(total / kVec, num_sms), kThreads, 0, stream>>>(a);
      } else {
        multistep_step_kernel<1, out_t, kGuided, kThresholded><<<grid_size(total, num_sms), kThreads, 0, stream>>>(a);
      }
    });
  });
  return cudaGetLastError();
}

int64_t loss_partials_per_row(int64_t numel) {
  const int64_t blocks = (numel + kLossElementsPerBlock - 1) / kLossElementsPerBlock;
  return std::max<int64_t>(1, std::min(blocks, kMaxLossBlocksPerRow));
}

cudaError_t diffusion_loss_forward(const LossArgs& a, cudaStream_t stream) {
  if (a.n == 0 || a.numel == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.partials_per_row), static_cast<unsigned>(a.n));
  dispatch_float(a.model_output_dtype, [&](auto tag) {
    using out_t = decltype(tag);
    if (a.numel % kVec == 0 && aligned<out_t>(a.model_output, kVec) && aligned<float>(a.x0, kVec)) {
      loss_forward_kernel<kVec, out_t><<<grid, kThreads, 0, stream>>>(a);
    } else {
      loss_forward_kernel<1, out_t><<<grid, kThreads, 0, stream>>>(a);
    }
  });
  return cudaGetLastError();
}

cudaError_t diffusion_loss_backward(const LossArgs& a, int num_sms, cudaStream_t stream) {
  const int64_t total = a.n * a.numel;
  if (total == 0) return cudaSuccess;
  dispatch_float(a.model_output_dtype, [&](auto tag) {
    using out_t = decltype(tag);
    if (a.numel % kVec == 0 && aligned<out_t>(a.model_output, kVec) && aligned<float>(a.x0, kVec) &&
        aligned<out_t>(a.grad_model_output, kVec)) {
      loss_backward_kernel<kVec, out_t><<<grid_size(total / kVec, num_sms), kThreads, 0, stream>>>(a);
    } else {
      loss_backward_kernel<1, out_t><<<grid_size(total, num_sms), kThreads, 0, stream>>>(a);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastddpm

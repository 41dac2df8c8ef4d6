// Host API of the fused ops, the same for both devices: validate the inputs
// (TORCH_CHECK on each), allocate the outputs, fill the kernel arguments, run
// the CPU loops or launch the CUDA kernels on the current stream under a
// device guard.  Registered per dispatch key at the bottom.
//
// Nothing here synchronises with a GPU: values held in tensors (the t and step
// indices, the noise key rng of ddpm_step_) are checked on the host only for
// CPU tensors; CUDA kernels check them themselves.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fused_math.h"
#include "kernel_args.h"

#ifdef FASTDDPM_WITH_CUDA
// c10/cuda only (not ATen/cuda, which needs the cuBLAS/cuSPARSE headers): the
// runtime headers are all a minimal toolkit has.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>

#include "cuda_kernels.h"
#endif

namespace fastddpm {
namespace {

using at::Tensor;

// -- validation ------------------------------------------------------------------------
DType float_dtype(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastddpm: ", name, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

void check_dtype(const Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "fastddpm: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_device(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "fastddpm: ", name, " must be on ", like.device(), ", got ", t.device());
}

void check_seed(int64_t seed, int64_t sample_offset) {
  TORCH_CHECK(seed >= 0, "fastddpm: seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(sample_offset >= 0, "fastddpm: sample_offset must be >= 0, got ", sample_offset);
}

// Elements per sample: the product of every size but the first.
int64_t sample_numel(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1, "fastddpm: ", name, " must have a batch dimension, got a 0-dim tensor");
  int64_t numel = 1;
  for (int64_t d = 1; d < x.dim(); ++d) numel *= x.size(d);
  return numel;
}

// A float32 table [T] indexed per row, on x's device.
Tensor table_arg(const Tensor& table, const Tensor& x, const char* name) {
  check_dtype(table, at::kFloat, name);
  check_device(table, x, name);
  TORCH_CHECK(table.dim() == 1, "fastddpm: ", name, " must be 1-D, got shape ", table.sizes());
  return table.contiguous();
}

// t or step: int64, one value per row ([n]) or one value for every row (0-dim,
// [1], or an [n] expanded with stride 0).  Values must lie in [0, limit).
struct IndexArg {
  Tensor tensor;
  RowIndex index;
};

IndexArg index_arg(const Tensor& idx, const Tensor& x, int64_t limit, const char* name) {
  check_dtype(idx, at::kLong, name);
  check_device(idx, x, name);
  const int64_t n = x.size(0);
  Tensor t;
  int64_t stride = 1;
  if (idx.numel() == 1 && idx.dim() <= 1) {
    t = idx;
    stride = 0;
  } else {
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n, "fastddpm: ", name, " must have shape [", n,
                "] or hold a single value, got shape ", idx.sizes());
    stride = idx.stride(0) == 0 ? 0 : 1;
    t = stride == 0 ? idx : idx.contiguous();
  }
  if (t.is_cpu() && t.numel() > 0) {
    const Tensor values = stride == 0 ? t.reshape(-1).slice(0, 0, 1) : t;
    const int64_t lo = values.min().item<int64_t>(), hi = values.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < limit, "fastddpm: ", name, " must lie in [0, ", limit - 1, "], got values in [", lo,
                ", ", hi, "]");
  }
  return IndexArg{t, RowIndex{t.data_ptr<int64_t>(), stride, limit}};
}

int parse_prediction(const std::string& s) {
  if (s == "epsilon") return kEpsilon;
  if (s == "x0") return kX0;
  if (s == "v") return kV;
  TORCH_CHECK(false, "fastddpm: prediction must be one of epsilon, x0, v, got '", s, "'");
}

int parse_loss_type(const std::string& s) {
  if (s == "l2") return kL2;
  if (s == "l1") return kL1;
  if (s == "huber") return kHuber;
  TORCH_CHECK(false, "fastddpm: loss_type must be one of l2, l1, huber, got '", s, "'");
}

// -- device selection --------------------------------------------------------------------
// True for CUDA tensors (the CUDA part must be built), false for CPU ones.
bool on_cuda(const Tensor& t) {
  if (t.is_cpu()) return false;
  TORCH_CHECK(t.is_cuda(), "fastddpm: the fused ops run on CPU or CUDA tensors, got ", t.device());
#ifndef FASTDDPM_WITH_CUDA
  TORCH_CHECK(false, "fastddpm._C was built without CUDA");
#endif
  return true;
}

#ifdef FASTDDPM_WITH_CUDA
// Streaming multiprocessors of a device (sizes the grids), queried once.
int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), "fastddpm: CUDA device index ", device,
              " out of range");
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Device guard, current stream and grid sizing of one launch.
struct CudaLaunch {
  explicit CudaLaunch(const Tensor& t)
      : guard(t.device()),
        stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()),
        num_sms(multiprocessor_count(t.device().index())) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int num_sms;
};
#define FASTDDPM_CUDA_RUN(like, call)   \
  do {                                  \
    const CudaLaunch launch(like);      \
    C10_CUDA_CHECK(call);               \
  } while (0)
#else
#define FASTDDPM_CUDA_RUN(like, call) TORCH_CHECK(false, "fastddpm._C was built without CUDA")
#endif

// -- the noise contract alone ---------------------------------------------------------------
void run_philox(const PhiloxArgs& args, const Tensor& like) {
  if (on_cuda(like)) {
    FASTDDPM_CUDA_RUN(like, cuda::philox(args, launch.num_sms, launch.stream));
  } else {
    cpu::philox(args);
  }
}

Tensor philox_normal_op(int64_t seed, const Tensor& offsets) {
  check_dtype(offsets, at::kLong, "offsets");
  check_seed(seed, 0);
  const Tensor off = offsets.contiguous();
  Tensor normals = at::empty(off.sizes(), off.options().dtype(at::kFloat));
  run_philox(PhiloxArgs{seed, off.data_ptr<int64_t>(), off.numel(), normals.data_ptr<float>(), nullptr}, off);
  return normals;
}

Tensor philox4x32_op(int64_t seed, const Tensor& offsets) {
  check_dtype(offsets, at::kLong, "offsets");
  check_seed(seed, 0);
  const Tensor off = offsets.contiguous();
  std::vector<int64_t> sizes(off.sizes().begin(), off.sizes().end());
  sizes.push_back(4);
  Tensor words = at::empty(sizes, off.options());
  run_philox(PhiloxArgs{seed, off.data_ptr<int64_t>(), off.numel(), nullptr, words.data_ptr<int64_t>()}, off);
  return words;
}

// The two tables of q_sample and diffusion_loss, checked (float32, 1-D, on x's device) and contiguous.
struct ScheduleTables {
  Tensor sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod;
};

ScheduleTables schedule_tables(const Tensor& sqrt_alphas_cumprod, const Tensor& sqrt_one_minus_alphas_cumprod,
                               const Tensor& x) {
  return ScheduleTables{table_arg(sqrt_alphas_cumprod, x, "sqrt_alphas_cumprod"),
                        table_arg(sqrt_one_minus_alphas_cumprod, x, "sqrt_one_minus_alphas_cumprod")};
}

// -- q_sample -------------------------------------------------------------------------------
Tensor q_sample_op(const Tensor& x0, const Tensor& t, const Tensor& sqrt_alphas_cumprod,
                const Tensor& sqrt_one_minus_alphas_cumprod, int64_t seed, int64_t sample_offset) {
  const DType x0_dtype = float_dtype(x0.scalar_type(), "x0");
  const int64_t numel = sample_numel(x0, "x0");
  check_seed(seed, sample_offset);
  const Tensor x0c = x0.contiguous();
  const ScheduleTables tables = schedule_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0);
  const int64_t T = tables.sqrt_alphas_cumprod.size(0);
  TORCH_CHECK(tables.sqrt_one_minus_alphas_cumprod.size(0) == T,
              "fastddpm: the q_sample tables must have the same length");
  const IndexArg ti = index_arg(t, x0, T, "t");
  Tensor x_t = at::empty(x0.sizes(), x0.options().dtype(at::kFloat));
  const QSampleArgs args{x0c.data_ptr(), x0_dtype, ti.index, tables.sqrt_alphas_cumprod.data_ptr<float>(),
                         tables.sqrt_one_minus_alphas_cumprod.data_ptr<float>(), seed, sample_offset, x0.size(0),
                         numel, x_t.data_ptr<float>()};
  if (on_cuda(x0)) {
    FASTDDPM_CUDA_RUN(x0, cuda::q_sample(args, launch.num_sms, launch.stream));
  } else {
    cpu::q_sample(args);
  }
  return x_t;
}

// -- diffusion_loss --------------------------------------------------------------------------
struct LossInputs {
  Tensor model_output, x0;
  ScheduleTables tables;
  Tensor weights;
  IndexArg t;
  LossArgs args;
};

LossInputs loss_inputs(const Tensor& model_output, const Tensor& x0, const Tensor& t,
                       const Tensor& sqrt_alphas_cumprod, const Tensor& sqrt_one_minus_alphas_cumprod,
                       const Tensor& weights, int64_t seed, int64_t sample_offset, const std::string& prediction,
                       const std::string& loss_type, double huber_delta) {
  LossInputs in;
  const DType out_dtype = float_dtype(model_output.scalar_type(), "model_output");
  float_dtype(x0.scalar_type(), "x0");
  const int64_t numel = sample_numel(model_output, "model_output");
  TORCH_CHECK(x0.sizes() == model_output.sizes(), "fastddpm: x0 must have shape ", model_output.sizes(), ", got ",
              x0.sizes());
  check_device(x0, model_output, "x0");
  check_seed(seed, sample_offset);
  TORCH_CHECK(huber_delta > 0, "fastddpm: huber_delta must be > 0, got ", huber_delta);
  in.model_output = model_output.contiguous();
  in.x0 = x0.to(at::kFloat).contiguous();
  in.tables = schedule_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, model_output);
  in.weights = table_arg(weights, model_output, "weights");
  const int64_t T = in.tables.sqrt_alphas_cumprod.size(0);
  TORCH_CHECK(in.tables.sqrt_one_minus_alphas_cumprod.size(0) == T && in.weights.size(0) == T,
              "fastddpm: the diffusion_loss tables (sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights) "
              "must have the same length");
  in.t = index_arg(t, model_output, T, "t");
  LossArgs& a = in.args;
  a = LossArgs{};
  a.model_output = in.model_output.data_ptr();
  a.model_output_dtype = out_dtype;
  a.x0 = in.x0.data_ptr<float>();
  a.t = in.t.index;
  a.sqrt_alphas_cumprod = in.tables.sqrt_alphas_cumprod.data_ptr<float>();
  a.sqrt_one_minus_alphas_cumprod = in.tables.sqrt_one_minus_alphas_cumprod.data_ptr<float>();
  a.weights = in.weights.data_ptr<float>();
  a.seed = seed;
  a.sample_offset = sample_offset;
  a.n = model_output.size(0);
  a.numel = numel;
  a.prediction = parse_prediction(prediction);
  a.loss_type = parse_loss_type(loss_type);
  a.huber_delta = static_cast<float>(huber_delta);
  return in;
}

Tensor diffusion_loss_op(const Tensor& model_output, const Tensor& x0, const Tensor& t,
                      const Tensor& sqrt_alphas_cumprod, const Tensor& sqrt_one_minus_alphas_cumprod,
                      const Tensor& weights, int64_t seed, int64_t sample_offset, c10::string_view prediction,
                      c10::string_view loss_type, double huber_delta) {
  LossInputs in = loss_inputs(model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, seed,
                              sample_offset, std::string(prediction), std::string(loss_type), huber_delta);
  LossArgs& a = in.args;
  TORCH_CHECK(a.n > 0 && a.numel > 0, "fastddpm: diffusion_loss needs a non-empty batch");
  const bool cuda = on_cuda(model_output);
  TORCH_CHECK(!cuda || a.n <= 65535, "fastddpm: diffusion_loss on CUDA takes at most 65535 samples (grid.y), got ",
              a.n);
#ifdef FASTDDPM_WITH_CUDA
  a.partials_per_row = cuda ? cuda::loss_partials_per_row(a.numel) : cpu::loss_partials_per_row(a.numel);
#else
  a.partials_per_row = cpu::loss_partials_per_row(a.numel);
#endif
  Tensor partials = at::empty({a.n, a.partials_per_row}, model_output.options().dtype(at::kFloat));
  a.partials = partials.data_ptr<float>();
  if (cuda) {
    FASTDDPM_CUDA_RUN(model_output, cuda::diffusion_loss_forward(a, launch.stream));
  } else {
    cpu::diffusion_loss_forward(a);
  }
  // mean_b(weights[t_b] * sum_j / numel), reduced in float64 with ATen (deterministic)
  const Tensor per_sample = partials.sum(1, /*keepdim=*/false, at::kDouble) / static_cast<double>(a.numel);
  const Tensor w = in.weights.index_select(0, in.t.tensor.reshape(-1).expand({a.n}));
  return (per_sample * w.to(at::kDouble)).mean().to(at::kFloat);
}

Tensor diffusion_loss_backward_op(const Tensor& grad, const Tensor& model_output, const Tensor& x0, const Tensor& t,
                               const Tensor& sqrt_alphas_cumprod, const Tensor& sqrt_one_minus_alphas_cumprod,
                               const Tensor& weights, int64_t seed, int64_t sample_offset,
                               c10::string_view prediction, c10::string_view loss_type, double huber_delta) {
  LossInputs in = loss_inputs(model_output, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, seed,
                              sample_offset, std::string(prediction), std::string(loss_type), huber_delta);
  TORCH_CHECK(grad.numel() == 1, "fastddpm: grad must hold one value (the loss is a scalar), got shape ",
              grad.sizes());
  check_device(grad, model_output, "grad");
  const Tensor g = grad.to(at::kFloat).contiguous();
  Tensor grad_output = at::empty(model_output.sizes(), model_output.options());
  LossArgs& a = in.args;
  a.grad = g.data_ptr<float>();
  a.grad_model_output = grad_output.data_ptr();
  if (on_cuda(model_output)) {
    FASTDDPM_CUDA_RUN(model_output, cuda::diffusion_loss_backward(a, launch.num_sms, launch.stream));
  } else {
    cpu::diffusion_loss_backward(a);
  }
  return grad_output;
}

// -- classifier-free guidance ------------------------------------------------------------------
// The guidance arguments of every step op (StepArgs or MultistepArgs): uncond_output None, or a
// tensor of model_output's shape, dtype and device (a dim-0 slice of a [2n, ...] batch, say: made
// contiguous as model_output is); guidance_scale finite as a float32.  Returns the contiguous
// uncond_output the kernel reads (undefined for none), which the caller keeps alive.
template <typename Args>
Tensor set_guidance(Args& a, const Tensor& model_output, const std::optional<Tensor>& uncond_output,
                    double guidance_scale) {
  const float w = static_cast<float>(guidance_scale);
  TORCH_CHECK(std::isfinite(w), "fastddpm: guidance_scale must be finite (as a float32), got ", guidance_scale);
  a.guidance_scale = w;
  a.uncond_output = nullptr;
  if (!uncond_output.has_value()) return Tensor();
  const Tensor& u = *uncond_output;
  TORCH_CHECK(u.scalar_type() == model_output.scalar_type(), "fastddpm: uncond_output must have model_output's dtype ",
              model_output.scalar_type(), ", got ", u.scalar_type());
  TORCH_CHECK(u.sizes() == model_output.sizes(), "fastddpm: uncond_output must have shape ", model_output.sizes(),
              " (model_output's), got ", u.sizes());
  check_device(u, model_output, "uncond_output");
  Tensor uc = u.contiguous();
  a.uncond_output = uc.data_ptr();
  return uc;
}

// -- dynamic thresholding ------------------------------------------------------------------------
// The thresholding argument of every step op (StepArgs or MultistepArgs): threshold None, or the
// float32 [n] per-sample bounds on x's device (ops.dynamic_threshold; made contiguous).  Only its
// metadata is checked: reading the values of a CUDA tensor would synchronise.  Returns the
// contiguous tensor the kernel reads (undefined for none), which the caller keeps alive.
template <typename Args>
Tensor set_threshold(Args& a, const std::optional<Tensor>& threshold, const Tensor& x) {
  a.threshold = nullptr;
  if (!threshold.has_value()) return Tensor();
  const Tensor& s = *threshold;
  TORCH_CHECK(s.scalar_type() == at::kFloat, "fastddpm: threshold must be float32 (one bound per sample), got ",
              s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0), "fastddpm: threshold must have shape [", x.size(0),
              "] (one bound per sample of x), got ", s.sizes());
  check_device(s, x, "threshold");
  Tensor sc = s.contiguous();
  a.threshold = sc.data_ptr<float>();
  return sc;
}

// -- inpainting -----------------------------------------------------------------------------------
// The inpainting arguments of ddpm_step, ddpm_step_cast and ddpm_step_: known and mask both None, or
// both float32 tensors of x's shape on its device (the caller broadcasts; made contiguous), and then
// the 2K + 1 noise slots of the blend (z1 is slot step + K + 1) must fit the counter's low word.
// Returns the contiguous pair the kernel reads (undefined for none), which the caller keeps alive.
Tensor blend_arg(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastddpm: ", name, " must be float32 (the inpainting blend), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "fastddpm: ", name, " must have x's shape ", x.sizes(),
              " (the caller broadcasts it), got ", t.sizes());
  check_device(t, x, name);
  return t.contiguous();
}

void check_inpaint_pair(const std::optional<Tensor>& known, const std::optional<Tensor>& mask) {
  TORCH_CHECK(known.has_value() || !mask.has_value(),
              "fastddpm: mask was given without known: the inpainting blend needs both (or neither)");
  TORCH_CHECK(mask.has_value() || !known.has_value(),
              "fastddpm: known was given without mask: the inpainting blend needs both (or neither)");
}

std::pair<Tensor, Tensor> set_inpaint(StepArgs& a, const std::optional<Tensor>& known,
                                      const std::optional<Tensor>& mask, const Tensor& x, int64_t steps) {
  a.known = a.mask = nullptr;
  check_inpaint_pair(known, mask);
  if (!known.has_value()) return {};
  Tensor kc = blend_arg(*known, x, "known"), mc = blend_arg(*mask, x, "mask");
  TORCH_CHECK((2 * steps + 1) * a.numel <= (int64_t{1} << 32), "fastddpm: noise counter overflow: the inpainting "
              "blend's ", 2 * steps + 1, " noise slots x ", a.numel, " elements per sample exceed 2**32");
  a.known = kc.data_ptr<float>();
  a.mask = mc.data_ptr<float>();
  return {kc, mc};
}

// -- ddpm_step ---------------------------------------------------------------------------------
struct StepInputs {
  Tensor model_output, uncond_output, threshold, coefs, known, mask;
  IndexArg step;
  StepArgs args;
};

StepInputs step_inputs(const Tensor& x, const Tensor& model_output, const Tensor& step, const Tensor& coefs,
                       bool clip_denoised, const std::optional<Tensor>& uncond_output, double guidance_scale,
                       const std::optional<Tensor>& threshold, const std::optional<Tensor>& known,
                       const std::optional<Tensor>& mask) {
  StepInputs in;
  check_dtype(x, at::kFloat, "x");
  const int64_t numel = sample_numel(x, "x");
  const DType out_dtype = float_dtype(model_output.scalar_type(), "model_output");
  TORCH_CHECK(model_output.sizes() == x.sizes(), "fastddpm: model_output must have shape ", x.sizes(), ", got ",
              model_output.sizes());
  check_device(model_output, x, "model_output");
  check_dtype(coefs, at::kFloat, "coefs");
  check_device(coefs, x, "coefs");
  check_inpaint_pair(known, mask);
  // 8 columns with the inpainting blend (its ka, kb last), 6 without
  const int64_t columns = known.has_value() ? kInpaintColumns : kCoefColumns;
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(1) == columns, "fastddpm: coefs must have shape [K, ", columns, "] ",
              known.has_value() ? "with known (a, b, c0, c1, sigma, c2, ka, kb)" : "without known (a, b, c0, c1, sigma, c2)",
              ", got ", coefs.sizes());
  in.model_output = model_output.contiguous();
  in.coefs = coefs.contiguous();
  in.step = index_arg(step, x, coefs.size(0), "step");
  StepArgs& a = in.args;
  a = StepArgs{};
  a.model_output = in.model_output.data_ptr();
  a.model_output_dtype = out_dtype;
  a.step = in.step.index;
  a.coefs = in.coefs.data_ptr<float>();
  a.coef_columns = columns;
  a.clip_denoised = clip_denoised;
  a.n = x.size(0);
  a.numel = numel;
  in.uncond_output = set_guidance(a, model_output, uncond_output, guidance_scale);
  in.threshold = set_threshold(a, threshold, x);
  std::tie(in.known, in.mask) = set_inpaint(a, known, mask, x, coefs.size(0));
  return in;
}

// The noise key as two ints (the functional ops): launch arguments of the kernel.
void set_seed(StepArgs& a, int64_t seed, int64_t sample_offset) {
  check_seed(seed, sample_offset);
  a.seed = seed;
  a.sample_offset = sample_offset;
}

// The noise key as a tensor (ddpm_step_): rng = (seed, sample_offset), int64 [2], contiguous, on x's
// device.  The kernel reads it, so a captured CUDA graph draws the noise of whatever rng holds at
// replay time.  Its values are checked here for CPU tensors only (reading a CUDA one would sync);
// the CUDA kernel traps on negative ones.
const int64_t* rng_arg(const Tensor& rng, const Tensor& x) {
  check_dtype(rng, at::kLong, "rng");
  check_device(rng, x, "rng");
  TORCH_CHECK(rng.dim() == 1 && rng.size(0) == 2, "fastddpm: rng must have shape [2] (seed, sample_offset), got shape ",
              rng.sizes());
  TORCH_CHECK(rng.is_contiguous(), "fastddpm: rng must be contiguous, got strides ", rng.strides());
  const int64_t* key = rng.data_ptr<int64_t>();
  if (rng.is_cpu()) {
    TORCH_CHECK(key[0] >= 0 && key[1] >= 0,
                "fastddpm: rng must hold (seed, sample_offset) with seed in [0, 2**63) and sample_offset >= 0, got (",
                key[0], ", ", key[1], ")");
  }
  return key;
}

void set_rng(StepArgs& a, const Tensor& rng, const Tensor& x) { a.rng = rng_arg(rng, x); }

// The optional low-precision copy (StepArgs or MultistepArgs): x's shape, contiguous or channels_last.
template <typename Args>
void set_model_input(Args& a, const Tensor& model_input, const Tensor& x) {
  a.model_input_dtype = float_dtype(model_input.scalar_type(), "model_input");
  TORCH_CHECK(model_input.sizes() == x.sizes(), "fastddpm: model_input must have shape ", x.sizes(), ", got ",
              model_input.sizes());
  check_device(model_input, x, "model_input");
  const bool contiguous = model_input.is_contiguous();
  a.channels_last = !contiguous && x.dim() == 4 && model_input.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(contiguous || a.channels_last, "fastddpm: model_input must be contiguous or channels_last");
  if (a.channels_last) {
    a.channels = x.size(1);
    a.spatial = x.size(2) * x.size(3);
  }
  a.model_input = model_input.data_ptr();
}

void run_step(const StepArgs& a, const Tensor& x) {
  if (on_cuda(x)) {
    FASTDDPM_CUDA_RUN(x, cuda::ddpm_step(a, launch.num_sms, launch.stream));
  } else {
    cpu::ddpm_step(a);
  }
}

Tensor ddpm_step_op(const Tensor& x, const Tensor& model_output, const Tensor& step, const Tensor& coefs, int64_t seed,
                 int64_t sample_offset, bool clip_denoised, const std::optional<Tensor>& uncond_output,
                 double guidance_scale, const std::optional<Tensor>& threshold, const std::optional<Tensor>& known,
                 const std::optional<Tensor>& mask) {
  StepInputs in = step_inputs(x, model_output, step, coefs, clip_denoised, uncond_output, guidance_scale, threshold,
                              known, mask);
  set_seed(in.args, seed, sample_offset);
  const Tensor xc = x.contiguous();
  Tensor x_prev = at::empty(x.sizes(), x.options());
  in.args.x = xc.data_ptr<float>();
  in.args.x_prev = x_prev.data_ptr<float>();
  run_step(in.args, x);
  return x_prev;
}

std::tuple<Tensor, Tensor> ddpm_step_cast_op(const Tensor& x, const Tensor& model_output, const Tensor& step,
                                          const Tensor& coefs, int64_t seed, int64_t sample_offset,
                                          bool clip_denoised, at::ScalarType model_dtype, bool channels_last,
                                          const std::optional<Tensor>& uncond_output, double guidance_scale,
                                          const std::optional<Tensor>& threshold, const std::optional<Tensor>& known,
                                          const std::optional<Tensor>& mask) {
  StepInputs in = step_inputs(x, model_output, step, coefs, clip_denoised, uncond_output, guidance_scale, threshold,
                              known, mask);
  set_seed(in.args, seed, sample_offset);
  TORCH_CHECK(!channels_last || x.dim() == 4, "fastddpm: channels_last needs a 4-D x, got shape ", x.sizes());
  float_dtype(model_dtype, "model_dtype");
  const Tensor xc = x.contiguous();
  Tensor x_prev = at::empty(x.sizes(), x.options());
  Tensor model_input = at::empty(
      x.sizes(), x.options().dtype(model_dtype).memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                            : at::MemoryFormat::Contiguous));
  in.args.x = xc.data_ptr<float>();
  in.args.x_prev = x_prev.data_ptr<float>();
  set_model_input(in.args, model_input, x);
  run_step(in.args, x);
  return {x_prev, model_input};
}

void ddpm_step_inplace_op(const Tensor& x, const Tensor& model_output, const Tensor& step, const Tensor& coefs,
                          const Tensor& rng, bool clip_denoised, const std::optional<Tensor>& model_input,
                          const std::optional<Tensor>& uncond_output, double guidance_scale,
                          const std::optional<Tensor>& threshold, const std::optional<Tensor>& known,
                          const std::optional<Tensor>& mask) {
  StepInputs in = step_inputs(x, model_output, step, coefs, clip_denoised, uncond_output, guidance_scale, threshold,
                              known, mask);
  set_rng(in.args, rng, x);
  TORCH_CHECK(x.is_contiguous(), "fastddpm: ddpm_step_ updates x in place and needs it contiguous");
  in.args.x = x.data_ptr<float>();
  in.args.x_prev = x.data_ptr<float>();  // each element is read before it is written
  if (model_input.has_value()) set_model_input(in.args, *model_input, x);
  run_step(in.args, x);
}

// -- multistep_step_ -----------------------------------------------------------------------------
// One multistep solver step in place (fastddpm/multistep.py): x <- x_next, history advanced, and
// model_input (if given) <- x_next in its dtype and layout, as ddpm_step_; guided and thresholded as
// ddpm_step.  Only metadata is checked, plus the step index and the key for CPU tensors (CUDA kernels
// trap on bad ones).
void multistep_step_inplace_op(const Tensor& x, const Tensor& model_output, const Tensor& history, const Tensor& step,
                               const Tensor& table, const Tensor& rng, bool clip_denoised, bool stochastic,
                               const std::optional<Tensor>& model_input, const std::optional<Tensor>& uncond_output,
                               double guidance_scale, const std::optional<Tensor>& threshold) {
  check_dtype(x, at::kFloat, "x");
  const int64_t numel = sample_numel(x, "x");
  TORCH_CHECK(x.is_contiguous(), "fastddpm: multistep_step_ updates x in place and needs it contiguous");
  const DType out_dtype = float_dtype(model_output.scalar_type(), "model_output");
  TORCH_CHECK(model_output.sizes() == x.sizes(), "fastddpm: model_output must have shape ", x.sizes(), ", got ",
              model_output.sizes());
  check_device(model_output, x, "model_output");
  check_dtype(history, at::kFloat, "history");
  check_device(history, x, "history");
  std::vector<int64_t> ring(x.sizes().begin(), x.sizes().end());
  ring.insert(ring.begin(), kHistorySlots);
  TORCH_CHECK(history.sizes() == at::IntArrayRef(ring), "fastddpm: history must have shape ", at::IntArrayRef(ring),
              " ([", kHistorySlots, ", *x.shape]), got ", history.sizes());
  TORCH_CHECK(history.is_contiguous(), "fastddpm: history is updated in place and must be contiguous");
  check_dtype(table, at::kFloat, "table");
  check_device(table, x, "table");
  TORCH_CHECK(table.dim() == 2 && table.size(0) >= 1 && table.size(1) == kMultistepColumns,
              "fastddpm: table must have shape [K, ", kMultistepColumns, "] with K >= 1, got ", table.sizes());
  check_dtype(step, at::kLong, "step");
  TORCH_CHECK(step.numel() == 1 && step.dim() <= 1,
              "fastddpm: step must hold one value (0-dim or [1]): the step of the whole batch, got shape ",
              step.sizes());
  const Tensor mo = model_output.contiguous();
  const Tensor tab = table.contiguous();
  const IndexArg si = index_arg(step, x, tab.size(0), "step");
  MultistepArgs a{};
  a.x = x.data_ptr<float>();
  a.model_output = mo.data_ptr();
  a.model_output_dtype = out_dtype;
  a.history = history.data_ptr<float>();
  a.step = si.index;
  a.table = tab.data_ptr<float>();
  a.rng = rng_arg(rng, x);
  a.clip_denoised = clip_denoised;
  a.stochastic = stochastic;
  a.n = x.size(0);
  a.numel = numel;
  const Tensor uncond = set_guidance(a, model_output, uncond_output, guidance_scale);
  const Tensor bounds = set_threshold(a, threshold, x);
  if (model_input.has_value()) set_model_input(a, *model_input, x);
  if (on_cuda(x)) {
    FASTDDPM_CUDA_RUN(x, cuda::multistep_step(a, launch.num_sms, launch.stream));
  } else {
    cpu::multistep_step(a);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("philox_normal", &philox_normal_op);
  m.impl("philox4x32", &philox4x32_op);
  m.impl("q_sample", &q_sample_op);
  m.impl("diffusion_loss", &diffusion_loss_op);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_op);
  m.impl("ddpm_step", &ddpm_step_op);
  m.impl("ddpm_step_cast", &ddpm_step_cast_op);
  m.impl("ddpm_step_", &ddpm_step_inplace_op);
  m.impl("multistep_step_", &multistep_step_inplace_op);
}

#ifdef FASTDDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("philox_normal", &philox_normal_op);
  m.impl("philox4x32", &philox4x32_op);
  m.impl("q_sample", &q_sample_op);
  m.impl("diffusion_loss", &diffusion_loss_op);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_op);
  m.impl("ddpm_step", &ddpm_step_op);
  m.impl("ddpm_step_cast", &ddpm_step_cast_op);
  m.impl("ddpm_step_", &ddpm_step_inplace_op);
  m.impl("multistep_step_", &multistep_step_inplace_op);
}
#endif

}  // namespace fastddpm

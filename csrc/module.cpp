// The Python module fastddpm._C and the op schemas, declared once.
//
// Importing the module runs the static registrations: the schemas below and
// the CPU/CUDA implementations in ops.cpp.  Fake (meta) implementations and
// the autograd formula of diffusion_loss live in fastddpm/ops/ (fakes.py, autograd.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastddpm, m) {
  // tl.randn(seed, offsets): Philox4x32-10 + Box-Muller (fastddpm/noise.py)
  m.def("philox_normal(int seed, Tensor offsets) -> Tensor");
  // the four Philox4x32-10 words of each offset, int64 [..., 4] (to test the integers exactly)
  m.def("philox4x32(int seed, Tensor offsets) -> Tensor");
  // x_t = sqrt(abar[t_b]) x0 + sqrt(1 - abar[t_b]) eps, eps generated in the kernel
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, "
      "int seed, int sample_offset) -> Tensor");
  // mean_b(weights[t_b] * mean_j(loss(out - target))), 0-dim float32
  m.def(
      "diffusion_loss(Tensor model_output, Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, Tensor weights, int seed, int sample_offset, str prediction, "
      "str loss_type, float huber_delta) -> Tensor");
  // d diffusion_loss / d model_output, times the upstream 0-dim grad
  m.def(
      "diffusion_loss_backward(Tensor grad, Tensor model_output, Tensor x0, Tensor t, "
      "Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, Tensor weights, int seed, "
      "int sample_offset, str prediction, str loss_type, float huber_delta) -> Tensor");
  // x_prev = c0 clip?(a x + b out) + c1 x + sigma z with coefs[step_b] = (a, b, c0, c1, sigma)
  m.def(
      "ddpm_step(Tensor x, Tensor model_output, Tensor step, Tensor coefs, int seed, int sample_offset, "
      "bool clip_denoised) -> Tensor");
  // ... plus a copy of x_prev in model_dtype (channels_last if asked) for the next model call
  m.def(
      "ddpm_step_cast(Tensor x, Tensor model_output, Tensor step, Tensor coefs, int seed, int sample_offset, "
      "bool clip_denoised, ScalarType model_dtype, bool channels_last) -> (Tensor, Tensor)");
  // in place, into preallocated buffers: the form a captured CUDA graph replays.  The noise key
  // rng = (seed, sample_offset), int64 [2] on x's device, is read by the kernel, so one captured
  // graph serves every seed: a new one is written into rng between replays.  model_input has no
  // default: torch 2.11's custom ops fail on a mutable optional argument with one (IndexError).
  m.def(
      "ddpm_step_(Tensor(a!) x, Tensor model_output, Tensor step, Tensor coefs, Tensor rng, "
      "bool clip_denoised, Tensor(b!)? model_input) -> ()");
  // one multistep solver step (fastddpm/multistep.py), in place: x <- x_next, history[step % 2] <- D,
  // history[2] <- x_corr; row table[step] ([K, 12]); step holds one value (a device counter); with
  // stochastic, the SDE noise of slot step under the key rng = (seed, sample_offset), as ddpm_step_
  m.def(
      "multistep_step_(Tensor(a!) x, Tensor model_output, Tensor(b!) history, Tensor step, Tensor table, "
      "Tensor rng, bool clip_denoised, bool stochastic) -> ()");
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastddpm's compiled ops; registered as torch.ops.fastddpm.* on import.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}

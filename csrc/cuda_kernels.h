// Launchers of the CUDA kernels (cuda_kernels.cu).  They enqueue on `stream`
// and return the launch status; the host API (ops.cpp) checks it.
#pragma once

#include <cuda_runtime_api.h>

#include "kernel_args.h"

namespace fastddpm {
namespace cuda {

cudaError_t philox(const PhiloxArgs& args, int num_sms, cudaStream_t stream);
cudaError_t q_sample(const QSampleArgs& args, int num_sms, cudaStream_t stream);
cudaError_t ddpm_step(const StepArgs& args, int num_sms, cudaStream_t stream);
cudaError_t multistep_step(const MultistepArgs& args, int num_sms, cudaStream_t stream);
int64_t loss_partials_per_row(int64_t numel);
cudaError_t diffusion_loss_forward(const LossArgs& args, cudaStream_t stream);
cudaError_t diffusion_loss_backward(const LossArgs& args, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastddpm

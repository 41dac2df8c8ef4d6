// The Python module fastddpm._C and the library of op schemas, defined from the one table.
//
// Importing the module runs the static registrations: the schemas (below) and
// the CPU/CUDA implementations in ops.cpp.  Fake (meta) implementations and
// the autograd formula of diffusion_loss live in fastddpm/ops/ (fakes.py, autograd.py).
#include <Python.h>
#include <torch/library.h>

// Every schema is a FASTDDPM_OP line of the one table, fastddpm/ops/schemas.def, which the
// Triton registration (kernels/_library.py) reads too.
TORCH_LIBRARY(fastddpm, m) {
#define FASTDDPM_OP(schema) m.def(schema);
#define FASTDDPM_CPP_OP(schema) m.def(schema);
#define FASTDDPM_TRITON_OP(schema)
#include "../fastddpm/ops/schemas.def"
#undef FASTDDPM_OP
#undef FASTDDPM_CPP_OP
#undef FASTDDPM_TRITON_OP
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

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

// source_hash: csrc/build.py's hash of the sources this build was compiled from (the "h" prefix
// keeps the token an identifier), so a carried or installed build can be checked against them.
#ifndef FASTDDPM_SOURCE_HASH
#define FASTDDPM_SOURCE_HASH hunknown
#endif
#define FASTDDPM_STRINGIZE_(x) #x
#define FASTDDPM_STRINGIZE(x) FASTDDPM_STRINGIZE_(x)

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastddpm's compiled ops; registered as torch.ops.fastddpm.* on import.",
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "source_hash", FASTDDPM_STRINGIZE(FASTDDPM_SOURCE_HASH) + 1) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

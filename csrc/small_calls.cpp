// The small-call fast path of pyllm.layer_norm / pyllm.rms_norm / pyllm.attention / pyllm.rotary (issue 15): one C++
// function per op, called by the Python op layer, that recognizes the common call (CPU tensors of a dtype the
// cpu backend serves, parameters of the input's dtype or float32, the default feature arguments), does the
// op layer's reshapes and calls the C++ op through the dispatcher (so autograd, profiling and dispatch modes
// see it as always). Anything else returns None and the Python op layer takes its full path: validation with
// its error messages, backend choice, the reference. A call through torch.ops from Python costs ~5 us
// (boxing the arguments, overload resolution) and the Python validation another ~10 us; this costs well
// under one.
//
// What the cpu backend serves (dtypes, the attention head_dim limit) is not restated here: the op layer
// configures each op once from pyllm.capabilities (`_small_calls_configure`); an unconfigured op never takes
// this path. The backend choice the fast path stands for is "auto" or "cpu" on CPU tensors: the op layer
// checks per-call `backend=` and `backends.use`; the environment variable PYLLM_BACKEND is read here.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "op_handles.h"

namespace pyllm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Op { kLayerNorm, kRmsNorm, kAttention, kRotary, kNumOps };
struct Config {
  uint64_t dtypes = 0;  // bit (1 << ScalarType) per dtype the cpu backend serves; 0 = not configured
  int64_t max_head_dim = -1;  // attention: -1 = no limit
};
Config g_config[kNumOps];

bool dtype_ok(Op op, c10::ScalarType t) {
  return (g_config[op].dtypes >> static_cast<int>(t)) & 1;
}

// The backend in force through the environment: the fast path stands for auto or cpu only.
bool env_allows_cpu() {
  const char* env = std::getenv("PYLLM_BACKEND");
  return env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0 || std::strcmp(env, "cpu") == 0;
}

// A plain torch.Tensor (or nn.Parameter) on the CPU; subclasses take the full path.
const Tensor* cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  return t.defined() && t.device().is_cpu() ? &t : nullptr;
}

// An optional tensor argument: true with *out = nullptr for None, true with the tensor, false for anything else.
bool optional_cpu_tensor(PyObject* obj, const Tensor** out) {
  *out = nullptr;
  if (obj == Py_None) return true;
  *out = cpu_tensor(obj);
  return *out != nullptr;
}

// A Python int (not bool) into *out.
bool exact_int(PyObject* obj, int64_t* out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return !overflow && !(*out == -1 && PyErr_Occurred());
}

// A finite Python float or int (not bool) into *out.
bool finite_number(PyObject* obj, double* out) {
  if (PyFloat_CheckExact(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
  } else {
    int64_t i = 0;
    if (!exact_int(obj, &i)) return false;
    *out = static_cast<double>(i);
  }
  return std::isfinite(*out);
}

struct ReleaseGil {  // the kernels run without the GIL, as torch's own bindings do
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

PyObject* none() { Py_RETURN_NONE; }

// (a, b) as a new Python tuple of two tensors, or nullptr with the Python error set.
PyObject* wrap_pair(Tensor a, Tensor b) {
  PyObject* py_a = THPVariable_Wrap(std::move(a));
  PyObject* py_b = py_a ? THPVariable_Wrap(std::move(b)) : nullptr;
  if (!py_b) {
    Py_XDECREF(py_a);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, py_a, py_b);
  Py_DECREF(py_a);
  Py_DECREF(py_b);
  return pair;
}

// The kernels take rows whose last dimension is contiguous (views of a packed projection are fine).
Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool common_state() { return !at::impl::torch_function_mode_enabled() && env_allows_cpu(); }

double finfo_eps(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::epsilon());
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::epsilon());
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    default: return static_cast<double>(std::numeric_limits<float>::epsilon());
  }
}

// layer_norm_fast(x, normalized_shape, weight, bias, residual, eps, rms) -> y, (y, h) with a residual, or None
PyObject* layer_norm_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "layer_norm_fast takes 7 arguments");
    return nullptr;
  }
  const bool rms = args[6] == Py_True;
  const Op op = rms ? kRmsNorm : kLayerNorm;
  const Tensor* x = cpu_tensor(args[0]);
  if (!x || !dtype_ok(op, x->scalar_type()) || x->numel() == 0 || !common_state()) return none();
  // normalized_shape: an int or a sequence of ints matching x's trailing dims
  int64_t shape[8];
  int64_t nd = 0;
  PyObject* ns = args[1];
  if (PyTuple_Check(ns) || PyList_Check(ns)) {
    nd = PySequence_Fast_GET_SIZE(ns);
    if (nd < 1 || nd > 8) return none();
    PyObject** items = PySequence_Fast_ITEMS(ns);
    for (int64_t i = 0; i < nd; ++i)
      if (!exact_int(items[i], &shape[i])) return none();
  } else if (exact_int(ns, &shape[0])) {
    nd = 1;
  } else {
    return none();
  }
  if (x->dim() < nd) return none();
  int64_t n = 1;
  for (int64_t i = 0; i < nd; ++i) {
    if (shape[i] <= 0 || x->size(x->dim() - nd + i) != shape[i]) return none();
    n *= shape[i];
  }
  const c10::IntArrayRef norm_shape(shape, nd);
  const Tensor *w = nullptr, *b = nullptr, *r = nullptr;
  if (!optional_cpu_tensor(args[2], &w) || !optional_cpu_tensor(args[3], &b) || !optional_cpu_tensor(args[4], &r))
    return none();
  for (const Tensor* p : {w, b})  // the op layer's dtype harmonization has nothing to do for these
    if (p && (p->sizes() != norm_shape || (p->scalar_type() != x->scalar_type() && p->scalar_type() != at::kFloat)))
      return none();
  if (r && (r->sizes() != x->sizes() || r->scalar_type() != x->scalar_type())) return none();
  double eps = 0;
  if (rms && args[5] == Py_None) {
    eps = finfo_eps(x->scalar_type());
  } else if (!finite_number(args[5], &eps) || !(eps >= 0)) {
    return none();
  }

  const auto& fwd = ops::layer_norm_fwd();
  const bool flat = x->dim() == 2 && nd == 1;  // already (M, N): no reshapes
  Tensor y, h;
  {
    ReleaseGil nogil;
    auto rows = [&](const Tensor& t) {
      Tensor t2 = flat ? t : t.reshape({-1, n});
      return t2.stride(1) != 1 ? t2.contiguous() : t2;
    };
    OptTensor w1, b1, r2;
    if (w) w1 = nd == 1 ? *w : w->reshape({n});
    if (b) b1 = nd == 1 ? *b : b->reshape({n});
    if (r) r2 = rows(*r);
    auto out = fwd.call(rows(*x), w1, b1, r2, eps, rms);
    y = flat ? std::get<0>(out) : std::get<0>(out).view(x->sizes());
    if (r) h = flat ? std::get<1>(out) : std::get<1>(out).view(x->sizes());
  }
  if (!r) return THPVariable_Wrap(std::move(y));
  return wrap_pair(std::move(y), std::move(h));
  END_HANDLE_TH_ERRORS
}

// attention_fast(q, k, v, causal, softmax_scale, key_padding_mask) -> o, or None
PyObject* attention_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "attention_fast takes 6 arguments");
    return nullptr;
  }
  const Tensor *q = cpu_tensor(args[0]), *k = cpu_tensor(args[1]), *v = cpu_tensor(args[2]);
  if (!q || !k || !v || !dtype_ok(kAttention, q->scalar_type()) || !common_state()) return none();
  if (q->dim() != 4 || k->dim() != 4 || v->dim() != 4) return none();
  if (k->scalar_type() != q->scalar_type() || v->scalar_type() != q->scalar_type()) return none();
  const int64_t B = q->size(0), Hq = q->size(2), D = q->size(3), Nk = k->size(1), Hkv = k->size(2);
  const int64_t max_d = g_config[kAttention].max_head_dim;
  if (k->size(0) != B || v->size(0) != B || k->size(3) != D || v->size(3) != D || D < 1 || (max_d >= 0 && D > max_d))
    return none();
  if (v->size(1) != Nk || v->size(2) != Hkv || Hkv == 0 || Hq % Hkv != 0) return none();
  if (q->numel() == 0 || k->numel() == 0) return none();
  if (args[3] != Py_True && args[3] != Py_False) return none();
  const bool causal = args[3] == Py_True;
  double scale = 0;
  if (args[4] == Py_None) {
    scale = std::pow(static_cast<double>(D), -0.5);  // Python's D ** -0.5
  } else if (!finite_number(args[4], &scale)) {
    return none();
  }
  const Tensor* mask = nullptr;
  if (!optional_cpu_tensor(args[5], &mask)) return none();
  if (mask && (mask->scalar_type() != at::kBool || mask->dim() != 2 || mask->size(0) != B || mask->size(1) != Nk))
    return none();

  const auto& fwd = ops::attention_fwd();
  Tensor o;
  {
    ReleaseGil nogil;
    OptTensor m;
    if (mask) m = *mask;
    o = std::get<0>(fwd.call(last_dim_contiguous(*q), last_dim_contiguous(*k), last_dim_contiguous(*v), m, causal,
                             scale));
  }
  return THPVariable_Wrap(std::move(o));
  END_HANDLE_TH_ERRORS
}

// rotary_fast(q, k, cos, sin, interleaved) -> (q_out, k_out), or None. The tables as the kernel takes them:
// (1 or B, N, r) contiguous float32 (float64 for float64 inputs), not requiring grad; the op layer reshapes
// and converts the others.
PyObject* rotary_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "rotary_fast takes 5 arguments");
    return nullptr;
  }
  const Tensor *q = cpu_tensor(args[0]), *k = cpu_tensor(args[1]), *cos = cpu_tensor(args[2]),
               *sin = cpu_tensor(args[3]);
  if (!q || !k || !cos || !sin || !dtype_ok(kRotary, q->scalar_type()) || !common_state()) return none();
  if (args[4] != Py_True && args[4] != Py_False) return none();
  if (q->dim() != 4 || k->dim() != 4 || k->scalar_type() != q->scalar_type() || q->numel() == 0 || k->numel() == 0)
    return none();
  const int64_t B = q->size(0), N = q->size(1), D = q->size(3);
  if (k->size(0) != B || k->size(1) != N || k->size(3) != D) return none();
  const auto table = q->scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const Tensor* t : {cos, sin})
    if (t->dim() != 3 || t->scalar_type() != table || !t->is_contiguous() || t->requires_grad()) return none();
  if (cos->sizes() != sin->sizes() || (cos->size(0) != 1 && cos->size(0) != B) || cos->size(1) != N ||
      cos->size(2) < 1 || 2 * cos->size(2) > D)
    return none();

  const auto& op = ops::rotary();
  Tensor qo, ko;
  {
    ReleaseGil nogil;
    std::tie(qo, ko) = op.call(last_dim_contiguous(*q), last_dim_contiguous(*k), *cos, *sin, args[4] == Py_True,
                               false);
  }
  return wrap_pair(std::move(qo), std::move(ko));
  END_HANDLE_TH_ERRORS
}

// _small_calls_configure(op, dtypes, max_head_dim): op "layer_norm" | "rms_norm" | "attention" | "rotary"; dtypes a
// sequence of dtype names ("float32", ...) the cpu backend serves; max_head_dim an int or None (no limit).
PyObject* configure(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !PyUnicode_Check(args[0]) || !(PyTuple_Check(args[1]) || PyList_Check(args[1]))) {
    PyErr_SetString(PyExc_TypeError, "_small_calls_configure(op: str, dtypes: tuple[str], max_head_dim)");
    return nullptr;
  }
  const char* name = PyUnicode_AsUTF8(args[0]);
  if (!name) return nullptr;
  Op op;
  if (std::strcmp(name, "layer_norm") == 0) op = kLayerNorm;
  else if (std::strcmp(name, "rms_norm") == 0) op = kRmsNorm;
  else if (std::strcmp(name, "attention") == 0) op = kAttention;
  else if (std::strcmp(name, "rotary") == 0) op = kRotary;
  else {
    PyErr_Format(PyExc_ValueError, "_small_calls_configure: unknown op %s", name);
    return nullptr;
  }
  static const std::pair<const char*, c10::ScalarType> kNames[] = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float64", at::kDouble}};
  uint64_t mask = 0;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(args[1]);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_ITEMS(args[1])[i];
    const char* d = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : nullptr;
    if (!d) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "_small_calls_configure: dtypes must be names");
      return nullptr;
    }
    for (const auto& [dn, t] : kNames)  // names the fast path does not know are left to the full path
      if (std::strcmp(d, dn) == 0) mask |= uint64_t(1) << static_cast<int>(t);
  }
  int64_t max_d = -1;
  if (args[2] != Py_None && !exact_int(args[2], &max_d)) {
    PyErr_SetString(PyExc_TypeError, "_small_calls_configure: max_head_dim must be an int or None");
    return nullptr;
  }
  g_config[op] = Config{mask, max_d};
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef small_call_methods[] = {
    {"layer_norm_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(layer_norm_fast)), METH_FASTCALL,
     "pyllm.layer_norm / rms_norm's common call (None: take the full path)"},
    {"attention_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(attention_fast)), METH_FASTCALL,
     "pyllm.attention's common call (None: take the full path)"},
    {"rotary_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(rotary_fast)), METH_FASTCALL,
     "pyllm.rotary's common call (None: take the full path)"},
    {"_small_calls_configure", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(configure)), METH_FASTCALL,
     "which dtypes (and head dims) the fast paths take, from pyllm.capabilities"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace pyllm

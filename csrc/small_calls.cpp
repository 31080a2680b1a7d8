// The small-call fast path of pyllm.layer_norm / pyllm.rms_norm / pyllm.attention / pyllm.rotary (issue 15): one C++
// function per op, called by the Python op layer, that recognizes the common call (CPU tensors of a dtype the
// cpu backend serves, parameters of the input's dtype or float32, the default feature arguments), does the
// op layer's reshapes and calls the C++ op through the dispatcher (so autograd, profiling and dispatch modes
// see it as always). Anything else returns None and the Python op layer takes its full path: validation with
// its error messages, backend choice, the reference. A call through torch.ops from Python costs ~5 us
// (boxing the arguments, overload resolution) and the Python validation another ~10 us; this costs well
// under one. decode_stack_fast, at the end, strings the same calls together for a whole decode step of a
// pre-norm decoder stack (generate()'s loop), so no Python runs between them.
//
// What the cpu backend serves (dtypes, the attention head_dim limit) is not restated here: the op layer
// configures each op once from pyllm.capabilities (`_small_calls_configure`); an unconfigured op never takes
// this path. The backend choice the fast path stands for is "auto" or "cpu" on CPU tensors: the op layer
// checks per-call `backend=` and `backends.use`; the environment variable PYLLM_BACKEND is read here.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "op_handles.h"

namespace pyllm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Op { kLayerNorm, kRmsNorm, kAttention, kRotary, kGeluTanh, kNumOps };
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

// *out = the value `name` stands for in `table`; false for a name it does not have.
template <typename E, size_t K>
bool named(const char* name, const std::pair<const char*, E> (&table)[K], E* out) {
  for (const auto& [n, e] : table)
    if (std::strcmp(name, n) == 0) {
      *out = e;
      return true;
    }
  return false;
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

// The norms' kernel call as the op layer makes it: x (..., *shape) normalized over its last nd dims (n elements),
// w, b of that shape or null, r like x or null -> (y, h = x + r) in x's shape (h undefined without r).
std::pair<Tensor, Tensor> norm_call(const Tensor& x, int64_t nd, int64_t n, const Tensor* w, const Tensor* b,
                                    const Tensor* r, double eps, bool rms) {
  const bool flat = x.dim() == 2 && nd == 1;  // already (M, N): no reshapes
  auto rows = [&](const Tensor& t) {
    Tensor t2 = flat ? t : t.reshape({-1, n});
    return t2.stride(1) != 1 ? t2.contiguous() : t2;
  };
  OptTensor w1, b1, r2;
  if (w) w1 = nd == 1 ? *w : w->reshape({n});
  if (b) b1 = nd == 1 ? *b : b->reshape({n});
  if (r) r2 = rows(*r);
  auto out = ops::layer_norm_fwd().call(rows(x), w1, b1, r2, eps, rms);
  Tensor y = flat ? std::get<0>(out) : std::get<0>(out).view(x.sizes());
  Tensor h;
  if (r) h = flat ? std::get<1>(out) : std::get<1>(out).view(x.sizes());
  return {std::move(y), std::move(h)};
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

  Tensor y, h;
  {
    ReleaseGil nogil;
    std::tie(y, h) = norm_call(*x, nd, n, w, b, r, eps, rms);
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

// ---------------------------------------------------------------------------------------------------------------
// decode_stack_fast(x, layers, final_norm, k_cache, v_cache, start, key_padding_mask, cos, sin, spec) -> y or None
//
// One decode step of a pre-norm decoder stack (pyllm.models' GPT and Llama blocks in eval mode, with a KV cache):
// the calls their decode methods make, in the same order with the same arguments (so the same bits), without
// Python between them. pyllm.models.block.StackPlan builds the arguments once per generate() call.
//   x (B, N, C): the embedded tokens.
//   layers: per block a tuple of 12 tensors or None: (norm1 weight, norm1 bias, qkv weight, qkv bias, out weight,
//     out bias, norm2 weight, norm2 bias, up weight, up bias, down weight, down bias); up / down are the MLP's
//     fc1 / fc2 (Llama: gate_up / down_proj).
//   final_norm: (weight, bias).
//   k_cache, v_cache: lists of (B, capacity, Hkv, D) buffers, one per block, positions 0..start-1 filled; the
//     step writes start..start+N-1 (the caller then advances its lengths).
//   key_padding_mask: (B, start + N) bool or None.  cos, sin: the rotary tables (1 or B, N, r) or None (no RoPE).
//   spec: (rms, eps, heads, kv_heads, head_dim, causal, mlp, intermediate, decode_rows, decode_min_rows): rms
//     picks RMSNorm over LayerNorm; eps a float (None: RMSNorm's default, finfo(dtype).eps); mlp "gelu" |
//     "gelu_tanh" | "relu" | "silu" (down(act(up x))) or "swiglu" (gate, u = split(up x, intermediate);
//     down(silu(gate) * u)); decode_min_rows, decode_rows: pyllm.nn.Linear's thresholds (decode_min_rows..
//     decode_rows rows run pyllm::linear_decode, others at::linear; decode_rows 0: never).
// Returns None, before anything is written, for a call it does not take (the Python decode methods then run).
namespace stack {

enum Mlp { kGelu, kGeluTanhAct, kRelu, kSilu, kSwiglu };

struct Linear {
  const Tensor* w = nullptr;
  const Tensor* b = nullptr;
};
struct Layer {
  const Tensor *n1w, *n1b, *n2w, *n2b;
  Linear qkv, out, up, down;
};

// A weight (out_f, in_f) in dtype t and its bias (out_f,) or None.
bool linear_arg(PyObject* w, PyObject* b, int64_t out_f, int64_t in_f, c10::ScalarType t, Linear* lin) {
  lin->w = cpu_tensor(w);
  if (!lin->w || lin->w->dim() != 2 || lin->w->size(0) != out_f || lin->w->size(1) != in_f ||
      lin->w->scalar_type() != t || !optional_cpu_tensor(b, &lin->b))
    return false;
  return !lin->b || (lin->b->dim() == 1 && lin->b->size(0) == out_f && lin->b->scalar_type() == t);
}

// A norm's weight or bias: None, or (C,) in the input's dtype or float32 (layer_norm_fast's rule).
bool norm_arg(PyObject* obj, int64_t C, c10::ScalarType t, const Tensor** out) {
  if (!optional_cpu_tensor(obj, out)) return false;
  const Tensor* p = *out;
  return !p || (p->dim() == 1 && p->size(0) == C && (p->scalar_type() == t || p->scalar_type() == at::kFloat));
}

// A cache buffer list: L (B, >= end, Hkv, D) tensors of dtype t. Held by reference (the list is mutable and the
// step runs without the GIL).
bool cache_arg(PyObject* list, size_t L, int64_t B, int64_t end, int64_t Hkv, int64_t D, c10::ScalarType t,
               std::vector<Tensor>* out) {
  if (!PyList_CheckExact(list) || static_cast<size_t>(PyList_GET_SIZE(list)) != L) return false;
  for (size_t i = 0; i < L; ++i) {
    const Tensor* c = cpu_tensor(PyList_GET_ITEM(list, i));
    if (!c || c->dim() != 4 || c->size(0) != B || c->size(1) < end || c->size(2) != Hkv || c->size(3) != D ||
        c->scalar_type() != t)
      return false;
    out->push_back(*c);
  }
  return true;
}

// pyllm.nn.Linear.forward in inference: the decode GEMV for rows_min..rows_max rows, at::linear otherwise.
Tensor linear(const Tensor& x, const Linear& lin, int64_t rows, int64_t rows_min, int64_t rows_max) {
  OptTensor b;
  if (lin.b) b = *lin.b;
  if (rows >= rows_min && rows <= rows_max) return ops::linear_decode().call(x, *lin.w, b);
  return at::linear(x, *lin.w, b);
}

}  // namespace stack

PyObject* decode_stack_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using namespace stack;
  if (nargs != 10) {
    PyErr_SetString(PyExc_TypeError, "decode_stack_fast takes 10 arguments");
    return nullptr;
  }
  PyObject* spec = args[9];
  if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != 10) return none();
  PyObject* const* sp = &PyTuple_GET_ITEM(spec, 0);
  const bool rms = sp[0] == Py_True;
  int64_t Hq = 0, Hkv = 0, D = 0, inter = 0, rows_max = 0, rows_min = 0;
  if (!exact_int(sp[2], &Hq) || !exact_int(sp[3], &Hkv) || !exact_int(sp[4], &D) || !exact_int(sp[7], &inter) ||
      !exact_int(sp[8], &rows_max) || !exact_int(sp[9], &rows_min) || rows_min < 1 ||
      (sp[5] != Py_True && sp[5] != Py_False) || !PyUnicode_Check(sp[6]))
    return none();
  const bool causal = sp[5] == Py_True;
  const char* mlp_name = PyUnicode_AsUTF8(sp[6]);
  if (!mlp_name) return nullptr;
  static const std::pair<const char*, Mlp> kMlps[] = {
      {"gelu", kGelu}, {"gelu_tanh", kGeluTanhAct}, {"relu", kRelu}, {"silu", kSilu}, {"swiglu", kSwiglu}};
  Mlp mlp;
  if (!named(mlp_name, kMlps, &mlp)) return none();

  const Tensor* x = cpu_tensor(args[0]);
  if (!x || x->dim() != 3 || x->numel() == 0 || !common_state()) return none();
  const auto t = x->scalar_type();
  const bool rotary = args[7] != Py_None;
  if (!dtype_ok(rms ? kRmsNorm : kLayerNorm, t) || !dtype_ok(kAttention, t) || (rotary && !dtype_ok(kRotary, t)) ||
      (mlp == kGeluTanhAct && !dtype_ok(kGeluTanh, t)))
    return none();
  const int64_t B = x->size(0), N = x->size(1), C = x->size(2), rows = B * N;
  const int64_t max_d = g_config[kAttention].max_head_dim;
  if (Hq < 1 || Hkv < 1 || Hq % Hkv != 0 || D < 1 || (max_d >= 0 && D > max_d) || inter < 1) return none();
  double eps = 0;
  if (rms && sp[1] == Py_None) {
    eps = finfo_eps(t);
  } else if (!finite_number(sp[1], &eps) || !(eps >= 0)) {
    return none();
  }
  int64_t start = 0;
  if (!exact_int(args[5], &start) || start < 0) return none();
  const int64_t end = start + N;

  // the blocks' parameters, by pointer: tuples (exact, so immutable) that the arguments hold for the whole call
  PyObject* layers = args[1];
  if (!PyTuple_CheckExact(layers) || PyTuple_GET_SIZE(layers) < 1) return none();
  const size_t L = PyTuple_GET_SIZE(layers);
  const int64_t up_f = mlp == kSwiglu ? 2 * inter : inter;
  std::vector<Layer> blocks(L);
  for (size_t i = 0; i < L; ++i) {
    PyObject* item = PyTuple_GET_ITEM(layers, i);
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 12) return none();
    PyObject* const* p = &PyTuple_GET_ITEM(item, 0);
    Layer& l = blocks[i];
    if (!norm_arg(p[0], C, t, &l.n1w) || !norm_arg(p[1], C, t, &l.n1b) || !norm_arg(p[6], C, t, &l.n2w) ||
        !norm_arg(p[7], C, t, &l.n2b) || !linear_arg(p[2], p[3], (Hq + 2 * Hkv) * D, C, t, &l.qkv) ||
        !linear_arg(p[4], p[5], C, Hq * D, t, &l.out) || !linear_arg(p[8], p[9], up_f, C, t, &l.up) ||
        !linear_arg(p[10], p[11], C, inter, t, &l.down))
      return none();
  }
  PyObject* fin = args[2];
  const Tensor *fw = nullptr, *fb = nullptr;
  if (!PyTuple_CheckExact(fin) || PyTuple_GET_SIZE(fin) != 2 || !norm_arg(PyTuple_GET_ITEM(fin, 0), C, t, &fw) ||
      !norm_arg(PyTuple_GET_ITEM(fin, 1), C, t, &fb))
    return none();
  std::vector<Tensor> kc, vc;
  if (!cache_arg(args[3], L, B, end, Hkv, D, t, &kc) || !cache_arg(args[4], L, B, end, Hkv, D, t, &vc))
    return none();
  const Tensor* mask = nullptr;
  if (!optional_cpu_tensor(args[6], &mask)) return none();
  if (mask && (mask->scalar_type() != at::kBool || mask->dim() != 2 || mask->size(0) != B || mask->size(1) != end))
    return none();
  const Tensor *cos = nullptr, *sin = nullptr;
  if (rotary) {  // rotary_fast's tables
    cos = cpu_tensor(args[7]);
    sin = cpu_tensor(args[8]);
    const auto table = t == at::kDouble ? at::kDouble : at::kFloat;
    for (const Tensor* tab : {cos, sin})
      if (!tab || tab->dim() != 3 || tab->scalar_type() != table || !tab->is_contiguous() || tab->requires_grad())
        return none();
    if (cos->sizes() != sin->sizes() || (cos->size(0) != 1 && cos->size(0) != B) || cos->size(1) != N ||
        cos->size(2) < 1 || 2 * cos->size(2) > D)
      return none();
  } else if (args[8] != Py_None) {
    return none();
  }

  const int64_t hq = Hq * D, hkv = Hkv * D;
  const double scale = std::pow(static_cast<double>(D), -0.5);  // Python's D ** -0.5
  OptTensor m;
  if (mask) m = *mask;
  Tensor h, residual;
  {
    ReleaseGil nogil;
    at::AutoDispatchBelowAutograd no_autograd;  // grad mode is off (the caller checks): nothing to record
    h = *x;
    for (size_t i = 0; i < L; ++i) {
      const Layer& l = blocks[i];
      Tensor normed;
      if (i == 0) {  // the first block has no residual to add yet
        normed = norm_call(h, 1, C, l.n1w, l.n1b, nullptr, eps, rms).first;
        residual = h;
      } else {
        std::tie(normed, residual) = norm_call(h, 1, C, l.n1w, l.n1b, &residual, eps, rms);
      }
      const Tensor qkv = linear(normed, l.qkv, rows, rows_min, rows_max);
      Tensor q = qkv.narrow(-1, 0, hq).view({B, N, Hq, D});
      Tensor k = qkv.narrow(-1, hq, hkv).view({B, N, Hkv, D});
      const Tensor v = qkv.narrow(-1, hq + hkv, hkv).view({B, N, Hkv, D});
      if (rotary)
        std::tie(q, k) = ops::rotary().call(last_dim_contiguous(q), last_dim_contiguous(k), *cos, *sin, false, false);
      kc[i].narrow(1, start, N).copy_(k);
      vc[i].narrow(1, start, N).copy_(v);
      const Tensor o = std::get<0>(ops::attention_fwd().call(
          last_dim_contiguous(q), last_dim_contiguous(kc[i].narrow(1, 0, end)),
          last_dim_contiguous(vc[i].narrow(1, 0, end)), m, causal, scale));
      const Tensor a = linear(o.reshape({B, N, hq}), l.out, rows, rows_min, rows_max);
      std::tie(normed, residual) = norm_call(a, 1, C, l.n2w, l.n2b, &residual, eps, rms);
      Tensor u = linear(normed, l.up, rows, rows_min, rows_max);
      switch (mlp) {
        case kGelu: u = at::gelu(u); break;
        case kGeluTanhAct: u = ops::gelu_tanh_fwd().call(u.is_contiguous() ? u : u.contiguous()); break;
        case kRelu: u = at::relu(u); break;
        case kSilu: u = at::silu(u); break;
        case kSwiglu: u = at::mul(at::silu(u.narrow(-1, 0, inter)), u.narrow(-1, inter, inter)); break;
      }
      h = linear(u, l.down, rows, rows_min, rows_max);
    }
    h = norm_call(h, 1, C, fw, fb, &residual, eps, rms).first;
  }
  return THPVariable_Wrap(std::move(h));
  END_HANDLE_TH_ERRORS
}

// _small_calls_configure(op, dtypes, max_head_dim): op "layer_norm" | "rms_norm" | "attention" | "rotary" |
// "gelu_tanh"; dtypes a
// sequence of dtype names ("float32", ...) the cpu backend serves; max_head_dim an int or None (no limit).
PyObject* configure(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !PyUnicode_Check(args[0]) || !(PyTuple_Check(args[1]) || PyList_Check(args[1]))) {
    PyErr_SetString(PyExc_TypeError, "_small_calls_configure(op: str, dtypes: tuple[str], max_head_dim)");
    return nullptr;
  }
  const char* name = PyUnicode_AsUTF8(args[0]);
  if (!name) return nullptr;
  static const std::pair<const char*, Op> kOps[] = {{"layer_norm", kLayerNorm}, {"rms_norm", kRmsNorm},
                                                     {"attention", kAttention}, {"rotary", kRotary},
                                                     {"gelu_tanh", kGeluTanh}};
  Op op;
  if (!named(name, kOps, &op)) {
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
    {"decode_stack_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(decode_stack_fast)), METH_FASTCALL,
     "one decode step of a pre-norm decoder stack (None: run the Python decode methods)"},
    {"_small_calls_configure", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(configure)), METH_FASTCALL,
     "which dtypes (and head dims) the fast paths take, from pyllm.capabilities"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace pyllm

// pybind11 module fastsampler.backends.cpu._C: numpy arrays in, numpy arrays out, the GIL released during compute.
//
// setup.py compiles this file once per SIMD path, each with its own module name (FASTSAMPLER_MODULE: _C_avx512,
// _C_avx2, _C_portable; _C for a single -march=native build); the package imports the best one the CPU runs as _C.
//
// Every argument is checked (dtype, shape, contiguity, id ranges) with a message naming it before any kernel runs, so
// bad input raises ValueError / TypeError instead of crashing the process.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastsampler/history.h"
#include "fastsampler/philox.h"
#include "fastsampler/pool.h"
#include "fastsampler/sampler.h"

#ifndef FASTSAMPLER_MODULE
#define FASTSAMPLER_MODULE _C
#endif

namespace py = pybind11;
namespace fs = fastsampler;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream o;
  o << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) o << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) o << ",";
  o << ")";
  return o.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// kind: 'f' float, 'i' signed int, 'u' unsigned; itemsize bytes
bool dtype_is(const py::array& a, char kind, int itemsize) {
  return a.dtype().kind() == kind && a.itemsize() == itemsize;
}

py::array as_array(const py::object& o, const char* name) {
  if (!py::isinstance<py::array>(o))
    throw py::type_error(std::string(name) + " must be a numpy array, got " +
                         py::str(py::type::of(o)).cast<std::string>());
  return py::reinterpret_borrow<py::array>(o);
}

// 1-D / 2-D C-contiguous array of the given dtype and (optionally) exact shape (-1: any).
py::array check(const py::object& o, const char* name, char kind, int itemsize, const char* dname,
                const std::vector<int64_t>& shape, bool contiguous = true) {
  py::array a = as_array(o, name);
  // the expected shape as text, built only for an error message (this runs on every call)
  auto want = [&shape]() {
    std::ostringstream w;
    w << "(";
    for (size_t i = 0; i < shape.size(); ++i) {
      w << (i ? ", " : "");
      if (shape[i] < 0)
        w << "*";
      else
        w << shape[i];
    }
    if (shape.size() == 1) w << ",";
    w << ")";
    return w.str();
  };
  if (!dtype_is(a, kind, itemsize))
    fail(std::string(name) + " must be " + dname + " of shape " + want() + ", got " + dtype_str(a) + " " +
         shape_str(a));
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) fail(std::string(name) + " must have shape " + want() + ", got " + shape_str(a));
  if (contiguous && !(a.flags() & py::array::c_style))
    fail(std::string(name) + " must be C-contiguous (call .contiguous() / np.ascontiguousarray), got strides " +
         py::str(py::cast(std::vector<py::ssize_t>(a.strides(), a.strides() + a.ndim()))).cast<std::string>());
  return a;
}

// 2-D array whose rows may be strided but whose last axis is contiguous; returns the row stride in elements.
int64_t row_stride_of(const py::array& a, const char* name) {
  const int64_t it = a.itemsize();
  if (a.shape(0) == 0) return a.shape(1);
  if (a.shape(1) > 1 && a.strides(1) != it)
    fail(std::string(name) + " must be contiguous along its last axis (stride " + std::to_string(it) + " bytes), got " +
         std::to_string(a.strides(1)));
  if (a.shape(0) > 1 && (a.strides(0) < 0 || a.strides(0) % it != 0))
    fail(std::string(name) + " must have a non-negative row stride that is a multiple of its item size, got " +
         std::to_string(a.strides(0)));
  return a.shape(0) > 1 ? a.strides(0) / it : a.shape(1);
}

std::atomic<int> g_threads{0};

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

struct Inputs {
  fs::BatchArgs args;
  int dtype = 0;                // 0 float32, 1 float16, 2 bfloat16
  std::vector<py::array> keep;  // keep arrays alive
};

Inputs parse(py::object logits_o, const std::string& dtype, int64_t vocab, py::object fparams, py::object iparams,
             py::object seeds, py::object steps, py::object seqs, py::object mu, py::object allowed, py::object prompt,
             py::object counts, py::object bias_indptr, py::object bias_ids, py::object bias_vals, py::object eos,
             py::object dry_ids, py::object dry_vals, int64_t n_top) {
  Inputs in;
  fs::BatchArgs& a = in.args;
  py::array lg = as_array(logits_o, "logits");
  if (lg.ndim() != 2) fail("logits must be 2-D (batch_size, vocab_size), got shape " + shape_str(lg));
  if (dtype == "float32") {
    if (!dtype_is(lg, 'f', 4)) fail("logits must be float32 for dtype='float32', got " + dtype_str(lg));
    in.dtype = 0;
  } else if (dtype == "float16") {
    if (!(dtype_is(lg, 'f', 2) || dtype_is(lg, 'i', 2) || dtype_is(lg, 'u', 2)))
      fail("logits must be float16 (or its int16 / uint16 bit view) for dtype='float16', got " + dtype_str(lg));
    in.dtype = 1;
  } else if (dtype == "bfloat16") {
    if (!(dtype_is(lg, 'i', 2) || dtype_is(lg, 'u', 2)))
      fail("logits must be an int16 / uint16 bit view of bfloat16 for dtype='bfloat16', got " + dtype_str(lg));
    in.dtype = 2;
  } else {
    fail("dtype must be 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
  }
  const int64_t B = lg.shape(0), V = lg.shape(1);
  if (V < 1) fail("logits must have at least one column, got shape " + shape_str(lg));
  if (V >= (int64_t{1} << 24))
    fail("logits may have at most 2^24 - 1 columns (ids are carried in float32 lanes), got " + std::to_string(V));
  if (vocab < 1 || vocab > V)
    fail("vocab_size must be in [1, " + std::to_string(V) + "] (logits.shape[1]), got " + std::to_string(vocab));
  a.logits = lg.data();
  a.B = B;
  a.V = V;
  a.vocab = vocab;
  a.row_stride = row_stride_of(lg, "logits");
  in.keep.push_back(lg);

  auto fa = check(fparams, "fparams", 'f', 4, "float32", {B, fs::NF});
  auto ia = check(iparams, "iparams", 'i', 4, "int32", {B, fs::NI});
  auto sa = check(seeds, "seeds", 'i', 8, "int64", {B});
  auto st = check(steps, "steps", 'i', 8, "int64", {B});
  auto sq = check(seqs, "seqs", 'i', 8, "int64", {B});
  auto ma = check(mu, "mirostat_mu", 'f', 4, "float32", {B});
  in.keep.insert(in.keep.end(), {fa, ia, sa, st, sq, ma});
  a.fparams = static_cast<const float*>(fa.data());
  a.iparams = static_cast<const int32_t*>(ia.data());
  a.seeds = static_cast<const int64_t*>(sa.data());
  a.steps = static_cast<const int64_t*>(st.data());
  a.seqs = static_cast<const int64_t*>(sq.data());
  a.mu_in = static_cast<const float*>(ma.data());
  if (n_top < 0 || n_top > fs::kMaxTopLogprobs)
    fail("n_top must be in [0, " + std::to_string(fs::kMaxTopLogprobs) + "], got " + std::to_string(n_top));
  a.n_top = n_top;
  for (int64_t r = 0; r < B; ++r) {
    const float* f = a.fparams + r * fs::NF;
    const int32_t* i = a.iparams + r * fs::NI;
    auto row = [r]() { return " of row " + std::to_string(r); };  // for error messages only
    if (!(f[fs::F_TEMPERATURE] >= 0.0f) || std::isinf(f[fs::F_TEMPERATURE]))
      fail("temperature" + row() + " must be finite and >= 0, got " + std::to_string(f[fs::F_TEMPERATURE]));
    if (!(f[fs::F_TOP_P] > 0.0f && f[fs::F_TOP_P] <= 1.0f))
      fail("top_p" + row() + " must be in (0, 1], got " + std::to_string(f[fs::F_TOP_P]));
    if (!(f[fs::F_MIN_P] >= 0.0f && f[fs::F_MIN_P] <= 1.0f))
      fail("min_p" + row() + " must be in [0, 1], got " + std::to_string(f[fs::F_MIN_P]));
    if (!(f[fs::F_TYPICAL_P] > 0.0f && f[fs::F_TYPICAL_P] <= 1.0f))
      fail("typical_p" + row() + " must be in (0, 1], got " + std::to_string(f[fs::F_TYPICAL_P]));
    if (!(f[fs::F_REP] > 0.0f) || std::isinf(f[fs::F_REP]))
      fail("repetition_penalty" + row() + " must be finite and > 0, got " + std::to_string(f[fs::F_REP]));
    if (!std::isfinite(f[fs::F_FREQ]) || !std::isfinite(f[fs::F_PRES]))
      fail("frequency_penalty / presence_penalty" + row() + " must be finite");
    if (!(f[fs::F_ETA] >= 0.0f && f[fs::F_ETA] < 1.0f))
      fail("eta_cutoff" + row() + " must be in [0, 1), got " + std::to_string(f[fs::F_ETA]));
    if (!(f[fs::F_NSIGMA] >= 0.0f) || std::isinf(f[fs::F_NSIGMA]))
      fail("top_n_sigma" + row() + " must be finite and >= 0, got " + std::to_string(f[fs::F_NSIGMA]));
    if (!(f[fs::F_XTC_P] >= 0.0f && f[fs::F_XTC_P] <= 1.0f))
      fail("xtc_probability" + row() + " must be in [0, 1], got " + std::to_string(f[fs::F_XTC_P]));
    if (!(f[fs::F_XTC_T] >= 0.0f && f[fs::F_XTC_T] <= 1.0f))
      fail("xtc_threshold" + row() + " must be in [0, 1], got " + std::to_string(f[fs::F_XTC_T]));
    if (!(f[fs::F_DYN_RANGE] >= 0.0f) || std::isinf(f[fs::F_DYN_RANGE]))
      fail("dynatemp_range" + row() + " must be finite and >= 0, got " + std::to_string(f[fs::F_DYN_RANGE]));
    if (!(f[fs::F_DYN_EXP] >= 0.0f) || std::isinf(f[fs::F_DYN_EXP]))
      fail("dynatemp_exponent" + row() + " must be finite and >= 0, got " + std::to_string(f[fs::F_DYN_EXP]));
    if (f[fs::F_DYN_RANGE] > 0.0f && f[fs::F_TEMPERATURE] == 0.0f)
      fail("dynatemp_range" + row() + " needs a temperature > 0 (greedy rows have none), got " +
           std::to_string(f[fs::F_DYN_RANGE]));
    if (i[fs::I_MIRO_MODE] < 0 || i[fs::I_MIRO_MODE] > 2)
      fail("mirostat_mode" + row() + " must be 0, 1 or 2, got " + std::to_string(i[fs::I_MIRO_MODE]));
    if (i[fs::I_LOGPROBS_MODE] < 0 || i[fs::I_LOGPROBS_MODE] > 2)
      fail("logprobs_mode" + row() + " must be 0 (raw), 1 (processed) or 2 (final), got " +
           std::to_string(i[fs::I_LOGPROBS_MODE]));
    if (i[fs::I_TOP_LOGPROBS] < 0 || i[fs::I_TOP_LOGPROBS] > n_top)
      fail("top_logprobs" + row() + " must be in [0, n_top=" + std::to_string(n_top) + "], got " +
           std::to_string(i[fs::I_TOP_LOGPROBS]));
  }
  const int64_t W = (vocab + 31) / 32;
  if (!allowed.is_none()) {
    auto al = check(allowed, "allowed_mask", 'i', 4, "int32", {B, -1}, false);
    if (al.shape(1) < W)
      fail("allowed_mask must have shape (" + std::to_string(B) + ", >= " + std::to_string(W) + "), got " +
           shape_str(al));
    a.allowed = static_cast<const int32_t*>(al.data());
    a.allowed_stride = row_stride_of(al, "allowed_mask");
    in.keep.push_back(al);
  }
  if (!prompt.is_none()) {
    auto pm = check(prompt, "prompt_mask", 'i', 4, "int32", {B, -1}, false);
    if (pm.shape(1) < W)
      fail("prompt_mask must have shape (" + std::to_string(B) + ", >= " + std::to_string(W) + "), got " +
           shape_str(pm));
    a.prompt = static_cast<const int32_t*>(pm.data());
    a.prompt_stride = row_stride_of(pm, "prompt_mask");
    in.keep.push_back(pm);
  }
  if (!counts.is_none()) {
    py::array oc = as_array(counts, "output_counts");
    if (!(dtype_is(oc, 'i', 2) || dtype_is(oc, 'i', 4)) || oc.ndim() != 2 || oc.shape(0) != B || oc.shape(1) < vocab)
      fail("output_counts must be int16 or int32 of shape (" + std::to_string(B) + ", >= " + std::to_string(vocab) +
           "), got " + dtype_str(oc) + " " + shape_str(oc));
    a.counts = oc.data();
    a.counts_bytes = static_cast<int>(oc.itemsize());
    a.counts_stride = row_stride_of(oc, "output_counts");
    in.keep.push_back(oc);
  }
  const bool has_bias = !bias_indptr.is_none() || !bias_ids.is_none() || !bias_vals.is_none();
  if (has_bias) {
    if (bias_indptr.is_none() || bias_ids.is_none() || bias_vals.is_none())
      fail("bias_indptr, bias_ids and bias_vals must be given together");
    auto bp = check(bias_indptr, "bias_indptr", 'i', 4, "int32", {B + 1});
    auto bi = check(bias_ids, "bias_ids", 'i', 4, "int32", {-1});
    auto bv = check(bias_vals, "bias_vals", 'f', 4, "float32", {bi.shape(0)});
    const int32_t* p = static_cast<const int32_t*>(bp.data());
    const int32_t* ids = static_cast<const int32_t*>(bi.data());
    const float* vals = static_cast<const float*>(bv.data());
    const int64_t nnz = bi.shape(0);
    if (p[0] != 0 || p[B] != nnz)
      fail("bias_indptr must start at 0 and end at len(bias_ids)=" + std::to_string(nnz) + ", got " +
           std::to_string(p[0]) + " .. " + std::to_string(p[B]));
    for (int64_t r = 0; r < B; ++r) {
      if (p[r + 1] < p[r]) fail("bias_indptr must be non-decreasing, row " + std::to_string(r));
      for (int64_t j = p[r]; j < p[r + 1]; ++j) {
        if (ids[j] < 0 || ids[j] >= vocab)
          fail("bias_ids of row " + std::to_string(r) + " holds token id " + std::to_string(ids[j]) +
               ", outside the vocabulary [0, " + std::to_string(vocab) + ")");
        if (j > p[r] && ids[j] <= ids[j - 1])
          fail("bias_ids of row " + std::to_string(r) + " must be sorted ascending without repeats");
        if (std::isnan(vals[j]) || vals[j] == std::numeric_limits<float>::infinity())
          fail("bias_vals of row " + std::to_string(r) + " must not be NaN or +inf");
      }
    }
    a.bias_indptr = p;
    a.bias_ids = ids;
    a.bias_vals = vals;
    in.keep.insert(in.keep.end(), {bp, bi, bv});
  }
  auto ea = check(eos, "eos_ids", 'i', 4, "int32", {-1});
  const int32_t* e = static_cast<const int32_t*>(ea.data());
  for (int64_t j = 0; j < ea.shape(0); ++j)
    if (e[j] < 0 || e[j] >= vocab)
      fail("eos_ids holds token id " + std::to_string(e[j]) + ", outside the vocabulary [0, " + std::to_string(vocab) +
           ")");
  a.eos = e;
  a.n_eos = ea.shape(0);
  in.keep.push_back(ea);
  if (dry_ids.is_none() != dry_vals.is_none()) fail("dry_ids and dry_vals must be given together");
  if (!dry_ids.is_none()) {  // DRY penalties (docs/semantics.md §3 C): per row, ids ascending, then padding
    auto di = check(dry_ids, "dry_ids", 'i', 4, "int32", {B, -1});
    const int64_t K = di.shape(1);
    auto dv = check(dry_vals, "dry_vals", 'f', 4, "float32", {B, K});
    const int32_t* ids = static_cast<const int32_t*>(di.data());
    const float* vals = static_cast<const float*>(dv.data());
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t j = 0; j < K; ++j) {
        const int32_t t = ids[r * K + j];
        const float v = vals[r * K + j];
        if (t == fs::kDryPad) {
          if (v != 0.0f) fail("dry_vals of row " + std::to_string(r) + " must be 0 at unused entries");
          continue;
        }
        if (t < 0 || t >= vocab)
          fail("dry_ids of row " + std::to_string(r) + " holds token id " + std::to_string(t) +
               ", outside the vocabulary [0, " + std::to_string(vocab) + ")");
        if (j > 0 && t <= ids[r * K + j - 1])
          fail("dry_ids of row " + std::to_string(r) + " must be ascending without repeats, padding last");
        // (+inf: a penalty beyond the float32 range, which masks the token, docs/semantics.md §5)
        if (!(v >= 0.0f)) fail("dry_vals of row " + std::to_string(r) + " must be >= 0 (or +inf), not NaN");
      }
    }
    a.dry_ids = ids;
    a.dry_vals = vals;
    a.dry_k = K;
    in.keep.insert(in.keep.end(), {di, dv});
  }
  return in;
}

bool use_openmp() {
#ifdef _OPENMP
  static const bool on = [] {
    const char* e = std::getenv("FASTSAMPLER_THREADING");
    return e != nullptr && std::string(e) == "openmp";
  }();
  return on;
#else
  return false;
#endif
}

template <typename T>
struct RowJob {
  const fs::BatchArgs* a;
  std::atomic<bool> failed{false};
  // this thread's scratch for input type T (kept between batches, see fs::kScratchCapBytes)
  static fs::Scratch& scratch() {
    static thread_local fs::Scratch tls;
    return tls;
  }
  static void call(void* ctx, int64_t r) {
    auto* job = static_cast<RowJob*>(ctx);
    fs::Scratch& s = scratch();
    try {
      fs::sample_row<T>(*job->a, r, s);
    } catch (...) {
      job->failed = true;
    }
    s.sync();
  }
  // end of the batch, on every thread that took part: free an oversized scratch
  static void done(void*) { scratch().trim(); }
};

// Rows over the persistent pool (default), or OpenMP when FASTSAMPLER_THREADING=openmp and compiled in. Every thread
// that ran rows trims its scratch before this returns.
template <typename T>
void run_rows(const fs::BatchArgs& a, int nthreads) {
  RowJob<T> job;
  job.a = &a;
  if (nthreads <= 1 || a.B <= 1) {
    for (int64_t r = 0; r < a.B; ++r) RowJob<T>::call(&job, r);
    RowJob<T>::done(&job);
  } else if (use_openmp()) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < a.B; ++r) RowJob<T>::call(&job, r);
      RowJob<T>::done(&job);
    }
#endif
  } else {
    fs::RowPool::instance().run(a.B, nthreads, &RowJob<T>::call, &job, &RowJob<T>::done);
  }
  if (job.failed) throw std::runtime_error("fastsampler._C: a row failed (out of memory?)");
}

void dispatch(const Inputs& in, int nthreads) {
  if (in.dtype == 0)
    run_rows<float>(in.args, nthreads);
  else if (in.dtype == 1)
    run_rows<fs::simd::fp16_t>(in.args, nthreads);
  else
    run_rows<fs::simd::bf16_t>(in.args, nthreads);
}

int resolve_threads(int num_threads) {
  if (num_threads < 0) fail("num_threads must be >= 0 (0: the module default), got " + std::to_string(num_threads));
  if (num_threads > 0) return num_threads;
  const int g = g_threads.load();
  return g > 0 ? g : default_threads();
}

py::tuple sample(py::object logits, const std::string& dtype, int64_t vocab, py::object fparams, py::object iparams,
                 py::object seeds, py::object steps, py::object seqs, py::object mu, py::object allowed,
                 py::object prompt, py::object counts, py::object bias_indptr, py::object bias_ids,
                 py::object bias_vals, py::object eos, py::object dry_ids, py::object dry_vals, int64_t n_top,
                 int num_threads, py::object forced) {
  Inputs in = parse(logits, dtype, vocab, fparams, iparams, seeds, steps, seqs, mu, allowed, prompt, counts,
                    bias_indptr, bias_ids, bias_vals, eos, dry_ids, dry_vals, n_top);
  const int64_t B = in.args.B;
  if (!forced.is_none()) {  // the rows' tokens are given: no draw, the outputs are those of these tokens
    auto fa = check(forced, "forced_tokens", 'i', 8, "int64", {B});
    const int64_t* f = static_cast<const int64_t*>(fa.data());
    for (int64_t r = 0; r < B; ++r)
      if (f[r] < 0 || f[r] >= vocab)
        fail("forced_tokens holds token id " + std::to_string(f[r]) + ", outside the vocabulary [0, " +
             std::to_string(vocab) + ")");
    in.args.forced = f;
    in.keep.push_back(fa);
  }
  py::array_t<int64_t> tokens(B), ranks(B);
  py::array_t<bool> valid(B);
  py::array_t<float> lps(B), mu_out(B);
  py::array_t<int64_t> top_ids({B, n_top});
  py::array_t<float> top_lps({B, n_top});
  fs::BatchArgs& a = in.args;
  a.tokens = tokens.mutable_data();
  a.ranks = ranks.mutable_data();
  a.valid = reinterpret_cast<uint8_t*>(valid.mutable_data());
  a.logprobs = lps.mutable_data();
  a.mu_out = mu_out.mutable_data();
  a.top_ids = top_ids.mutable_data();
  a.top_lps = top_lps.mutable_data();
  const int nt = resolve_threads(num_threads);
  if (B > 0) {
    py::gil_scoped_release release;
    dispatch(in, nt);
  }
  return py::make_tuple(tokens, valid, lps, top_ids, top_lps, ranks, mu_out);
}

py::array_t<float> sampling_probs(py::object logits, const std::string& dtype, int64_t vocab, py::object fparams,
                                  py::object iparams, py::object seeds, py::object steps, py::object seqs,
                                  py::object mu, py::object allowed, py::object prompt, py::object counts,
                                  py::object bias_indptr, py::object bias_ids, py::object bias_vals, py::object eos,
                                  py::object dry_ids, py::object dry_vals, int num_threads) {
  Inputs in = parse(logits, dtype, vocab, fparams, iparams, seeds, steps, seqs, mu, allowed, prompt, counts,
                    bias_indptr, bias_ids, bias_vals, eos, dry_ids, dry_vals, fs::kMaxTopLogprobs);
  const int64_t B = in.args.B, V = in.args.V;
  py::array_t<float> probs({B, V});
  in.args.probs = probs.mutable_data();
  const int nt = resolve_threads(num_threads);
  if (B > 0) {
    py::gil_scoped_release release;
    dispatch(in, nt);
  }
  return probs;
}

py::array_t<bool> kept_mask(py::object logits, const std::string& dtype, int64_t vocab, py::object fparams,
                            py::object iparams, py::object seeds, py::object steps, py::object seqs, py::object mu,
                            py::object allowed, py::object prompt, py::object counts, py::object bias_indptr,
                            py::object bias_ids, py::object bias_vals, py::object eos, py::object dry_ids,
                            py::object dry_vals, int num_threads) {
  Inputs in = parse(logits, dtype, vocab, fparams, iparams, seeds, steps, seqs, mu, allowed, prompt, counts,
                    bias_indptr, bias_ids, bias_vals, eos, dry_ids, dry_vals, fs::kMaxTopLogprobs);
  const int64_t B = in.args.B, V = in.args.V;
  py::array_t<bool> kept({B, V});
  in.args.kept = reinterpret_cast<uint8_t*>(kept.mutable_data());
  const int nt = resolve_threads(num_threads);
  if (B > 0) {
    py::gil_scoped_release release;
    dispatch(in, nt);
  }
  return kept;
}

// A Sampler step's state update on its host arrays, in place (slots distinct): steps[s] += valid[r], mu[s] = mu_out[r],
// counts[s, token[r]] += 1 up to kCountMax for valid rows, with s = slots[r]. One call instead of six numpy operations
// per step.
void advance_state(py::object steps_o, py::object mu_o, py::object counts_o, py::object slots_o, py::object tokens_o,
                   py::object valid_o, py::object mu_out_o) {
  auto steps = check(steps_o, "steps", 'i', 8, "int64", {-1});
  const int64_t S = steps.shape(0);
  auto mu = check(mu_o, "mu", 'f', 4, "float32", {S});
  auto counts = check(counts_o, "counts", 'i', 2, "int16", {S, -1});
  auto slots = check(slots_o, "slots", 'i', 8, "int64", {-1});
  const int64_t B = slots.shape(0), V = counts.shape(1);
  auto tokens = check(tokens_o, "tokens", 'i', 8, "int64", {B});
  auto valid = check(valid_o, "valid", 'b', 1, "bool", {B});
  auto mu_out = check(mu_out_o, "mu_out", 'f', 4, "float32", {B});
  for (const py::array* a : {&steps, &mu, &counts})
    if (!a->writeable()) fail("advance_state: the state arrays must be writeable");
  const int64_t* sl = static_cast<const int64_t*>(slots.data());
  const int64_t* tk = static_cast<const int64_t*>(tokens.data());
  const bool* ok = static_cast<const bool*>(valid.data());
  for (int64_t r = 0; r < B; ++r) {
    if (sl[r] < 0 || sl[r] >= S)
      fail("slots holds " + std::to_string(sl[r]) + ", outside [0, " + std::to_string(S) + ")");
    if (ok[r] && (tk[r] < 0 || tk[r] >= V))
      fail("tokens holds " + std::to_string(tk[r]) + ", outside [0, " + std::to_string(V) + ")");
  }
  int64_t* st = static_cast<int64_t*>(steps.mutable_data());
  float* m = static_cast<float*>(mu.mutable_data());
  int16_t* c = static_cast<int16_t*>(counts.mutable_data());
  const float* mo = static_cast<const float*>(mu_out.data());
  for (int64_t r = 0; r < B; ++r) {
    const int64_t s = sl[r];
    m[s] = mo[r];
    if (!ok[r]) continue;
    st[s] += 1;
    int16_t& cnt = c[s * V + tk[r]];
    if (cnt < fs::kCountMax) ++cnt;
  }
}

}  // namespace

// The history rules' allowed-token bitmask of each row (fastsampler/history.h): ring (S, L) int32, total (S,) int64,
// ngram (S,) int64, bad (S, P, M) int64 or None, rows (B,) int64 slots; returns (B, words) int32.
py::array_t<int32_t> history_keep(py::object ring_o, py::object total_o, py::object ngram_o, py::object bad_o,
                                  py::object rows_o, int64_t words) {
  auto ring = check(ring_o, "ring", 'i', 4, "int32", {-1, -1});
  const int64_t S = ring.shape(0), L = ring.shape(1);
  auto total = check(total_o, "total", 'i', 8, "int64", {S});
  auto ngram = check(ngram_o, "ngram", 'i', 8, "int64", {S});
  auto rows = check(rows_o, "rows", 'i', 8, "int64", {-1});
  if (words < 0) fail("words must be >= 0, got " + std::to_string(words));
  fs::HistoryArgs a;
  a.ring = static_cast<const int32_t*>(ring.data());
  a.L = L;
  a.total = static_cast<const int64_t*>(total.data());
  a.ngram = static_cast<const int64_t*>(ngram.data());
  a.rows = static_cast<const int64_t*>(rows.data());
  a.B = rows.shape(0);
  a.W = words;
  py::array bad;
  if (!bad_o.is_none()) {
    bad = check(bad_o, "bad", 'i', 8, "int64", {S, -1, -1});
    a.bad = static_cast<const int64_t*>(bad.data());
    a.P = bad.shape(1);
    a.M = bad.shape(2);
    if (a.P > 0 && a.M < 1) fail("bad must have at least one column");
  }
  for (int64_t r = 0; r < a.B; ++r)
    if (a.rows[r] < 0 || a.rows[r] >= S)
      fail("rows holds " + std::to_string(a.rows[r]) + ", outside [0, " + std::to_string(S) + ")");
  for (int64_t s = 0; s < S; ++s)
    if (a.total[s] < 0) fail("total must be >= 0, got " + std::to_string(a.total[s]));
  if (L == 0)
    for (int64_t r = 0; r < a.B; ++r)
      if (a.total[a.rows[r]] > 0) fail("a history ring of length 0 cannot hold tokens");
  py::array_t<int32_t> out({a.B, words});
  a.out = out.mutable_data();
  std::vector<int64_t> h(static_cast<size_t>(std::max<int64_t>(L, 1)));
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < a.B; ++r) fs::history_keep_row(a, r, h);
  }
  return out;
}

// DRY's penalty table of each row (fastsampler/history.h; docs/semantics.md §3 C): ring (S, L) int32, total (S,)
// int64, rows (B,) int64 slots, fd (S, 2) float64 (multiplier, base), idry (S, 2) int64 (allowed length, window),
// breakers (S, P, M) int64 or None; returns ids (B, K) int32 ascending per row (unused entries kDryPad) and values
// (B, K) float32 (0 there), K the largest entry count of any row.
py::tuple dry_edits(py::object ring_o, py::object total_o, py::object rows_o, py::object fd_o, py::object idry_o,
                    py::object breakers_o) {
  auto ring = check(ring_o, "ring", 'i', 4, "int32", {-1, -1});
  const int64_t S = ring.shape(0), L = ring.shape(1);
  auto total = check(total_o, "total", 'i', 8, "int64", {S});
  auto rows = check(rows_o, "rows", 'i', 8, "int64", {-1});
  auto fd = check(fd_o, "fd", 'f', 8, "float64", {S, 2});
  auto idry = check(idry_o, "idry", 'i', 8, "int64", {S, 2});
  fs::DryArgs a;
  a.ring = static_cast<const int32_t*>(ring.data());
  a.L = L;
  a.total = static_cast<const int64_t*>(total.data());
  a.fd = static_cast<const double*>(fd.data());
  a.idry = static_cast<const int64_t*>(idry.data());
  a.rows = static_cast<const int64_t*>(rows.data());
  a.B = rows.shape(0);
  py::array brk;
  if (!breakers_o.is_none()) {
    brk = check(breakers_o, "breakers", 'i', 8, "int64", {S, -1, -1});
    a.brk = static_cast<const int64_t*>(brk.data());
    a.P = brk.shape(1);
    a.M = brk.shape(2);
    if (a.P > 0 && a.M < 1) fail("breakers must have at least one column");
    for (int64_t q = 0; q < S * a.P; ++q) {
      const int64_t* b = a.brk + q * a.M;
      int64_t m = 0;
      while (m < a.M && b[m] >= 0) ++m;
      for (int64_t j = m; j < a.M; ++j)
        if (b[j] != -1)
          fail("breakers must hold token ids >= 0 left-aligned and padded with -1, got " + std::to_string(b[j]) +
               " at slot " + std::to_string(q / a.P) + ", breaker " + std::to_string(q % a.P));
    }
  }
  for (int64_t r = 0; r < a.B; ++r)
    if (a.rows[r] < 0 || a.rows[r] >= S)
      fail("rows holds " + std::to_string(a.rows[r]) + ", outside [0, " + std::to_string(S) + ")");
  for (int64_t s = 0; s < S; ++s) {
    if (a.total[s] < 0) fail("total must be >= 0, got " + std::to_string(a.total[s]));
    if (L == 0 && a.total[s] > 0) fail("a history ring of length 0 cannot hold tokens");
    const double mult = a.fd[2 * s], base = a.fd[2 * s + 1];
    if (!(mult >= 0.0) || std::isinf(mult) || (mult > 0.0 && (!(base >= 1.0) || std::isinf(base))))
      fail("fd of slot " + std::to_string(s) + " must hold a finite multiplier >= 0 and a finite base >= 1, got (" +
           std::to_string(mult) + ", " + std::to_string(base) + ")");
    if (a.idry[2 * s] < 0 || a.idry[2 * s + 1] < -1)
      fail("idry of slot " + std::to_string(s) + " must hold an allowed length >= 0 and a window >= -1, got (" +
           std::to_string(a.idry[2 * s]) + ", " + std::to_string(a.idry[2 * s + 1]) + ")");
  }
  std::vector<std::vector<std::pair<int32_t, float>>> per_row(static_cast<size_t>(a.B));
  int64_t K = 0;
  {
    py::gil_scoped_release release;
    fs::DryScratch scratch;
    for (int64_t r = 0; r < a.B; ++r) {
      fs::dry_row(a, r, scratch, per_row[r]);
      K = std::max<int64_t>(K, static_cast<int64_t>(per_row[r].size()));
    }
  }
  py::array_t<int32_t> ids({a.B, K});
  py::array_t<float> vals({a.B, K});
  int32_t* ip = ids.mutable_data();
  float* vp = vals.mutable_data();
  for (int64_t r = 0; r < a.B; ++r) {
    const auto& e = per_row[r];
    for (int64_t j = 0; j < K; ++j) {
      const bool used = j < static_cast<int64_t>(e.size());
      ip[r * K + j] = used ? e[j].first : fs::kDryPad;
      vp[r * K + j] = used ? e[j].second : 0.0f;
    }
  }
  return py::make_tuple(ids, vals);
}

// What this CPU (and its OS) runs, for the package to pick a variant without importing one it cannot run: "avx512"
// (x86-64-v4: AVX-512 F/BW/CD/DQ/VL over x86-64-v3), "avx2" (x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE),
// "portable" (always). Call it on the portable module: the others may use their instructions anywhere.
py::dict cpu_features() {
  bool v3 = false, v4 = false;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if defined(__clang__) || __GNUC__ < 12
  v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
       __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  v3 = __builtin_cpu_supports("x86-64-v3");
  v4 = __builtin_cpu_supports("x86-64-v4");
#endif
#endif
  py::dict d;
  d["avx512"] = v4;
  d["avx2"] = v3;
  d["portable"] = true;
  return d;
}

PYBIND11_MODULE(FASTSAMPLER_MODULE, m) {
  m.doc() = "fastsampler C++ CPU kernels (see fastsampler.cpu for the backend built on them)";
  m.def("sample", &sample, py::arg("logits"), py::arg("dtype"), py::arg("vocab_size"), py::arg("fparams"),
        py::arg("iparams"), py::arg("seeds"), py::arg("steps"), py::arg("seqs"), py::arg("mirostat_mu"),
        py::arg("allowed_mask") = py::none(), py::arg("prompt_mask") = py::none(),
        py::arg("output_counts") = py::none(), py::arg("bias_indptr") = py::none(), py::arg("bias_ids") = py::none(),
        py::arg("bias_vals") = py::none(), py::arg("eos_ids"), py::arg("dry_ids") = py::none(),
        py::arg("dry_vals") = py::none(), py::arg("n_top") = 0, py::arg("num_threads") = 0,
        py::arg("forced_tokens") = py::none(),
        "Sample one token per row (or take forced_tokens, int64 (B,), as the rows' tokens: no draw). Returns "
        "(tokens, valid, logprobs, top_ids, top_logprobs, ranks, mirostat_mu).");
  m.def("sampling_probs", &sampling_probs, py::arg("logits"), py::arg("dtype"), py::arg("vocab_size"),
        py::arg("fparams"), py::arg("iparams"), py::arg("seeds"), py::arg("steps"), py::arg("seqs"),
        py::arg("mirostat_mu"), py::arg("allowed_mask") = py::none(), py::arg("prompt_mask") = py::none(),
        py::arg("output_counts") = py::none(), py::arg("bias_indptr") = py::none(), py::arg("bias_ids") = py::none(),
        py::arg("bias_vals") = py::none(), py::arg("eos_ids"), py::arg("dry_ids") = py::none(),
        py::arg("dry_vals") = py::none(), py::arg("num_threads") = 0,
        "The (B, V) float32 distribution each row's token is drawn from.");
  m.def("kept_mask", &kept_mask, py::arg("logits"), py::arg("dtype"), py::arg("vocab_size"), py::arg("fparams"),
        py::arg("iparams"), py::arg("seeds"), py::arg("steps"), py::arg("seqs"), py::arg("mirostat_mu"),
        py::arg("allowed_mask") = py::none(), py::arg("prompt_mask") = py::none(),
        py::arg("output_counts") = py::none(), py::arg("bias_indptr") = py::none(), py::arg("bias_ids") = py::none(),
        py::arg("bias_vals") = py::none(), py::arg("eos_ids"), py::arg("dry_ids") = py::none(),
        py::arg("dry_vals") = py::none(), py::arg("num_threads") = 0,
        "The (B, V) bool kept set S of each row after truncation (greedy rows: the argmax; invalid "
        "rows and padding columns: False), exact even where a kept probability underflows.");
  m.def("advance_state", &advance_state, py::arg("steps"), py::arg("mu"), py::arg("counts"), py::arg("slots"),
        py::arg("tokens"), py::arg("valid"), py::arg("mu_out"),
        "A Sampler step's state update in place: steps[s] += valid, mu[s] = mu_out, counts[s, "
        "token] += 1 (int16, saturating at 32767) for valid rows, s = slots[r].");
  m.def("history_keep", &history_keep, py::arg("ring"), py::arg("total"), py::arg("ngram"), py::arg("bad"),
        py::arg("rows"), py::arg("words"),
        "The allowed-token bitmask (B, words) int32 of the history rules (no_repeat_ngram_size, bad_words_ids) of "
        "rows[r]'s ring (token j at ring[s, j % L], total[s] written).");
  m.def("dry_edits", &dry_edits, py::arg("ring"), py::arg("total"), py::arg("rows"), py::arg("fd"), py::arg("idry"),
        py::arg("breakers") = py::none(),
        "DRY's penalty table of rows[r]'s history ring: ids (B, K) int32 ascending (unused entries 2^31 - 1) and "
        "values (B, K) float32, K the largest entry count of any row.");
  m.def(
      "scratch_bytes", []() { return fs::scratch_bytes_counter().load(); },
      "Bytes held right now by the per-thread scratch buffers of every thread (all input types). "
      "After each call a thread whose scratch exceeds SCRATCH_CAP_BYTES frees it.");
  m.attr("SCRATCH_CAP_BYTES") = fs::kScratchCapBytes;
  // The packed-parameter layout, for the Python side to compare with its own at import: a mismatch there means the
  // extension was built from other sources than the package.
  py::dict layout;
  const std::pair<const char*, int64_t> entries[] = {
      {"F_TEMPERATURE", fs::F_TEMPERATURE},
      {"F_TOP_P", fs::F_TOP_P},
      {"F_MIN_P", fs::F_MIN_P},
      {"F_TYPICAL_P", fs::F_TYPICAL_P},
      {"F_FREQ", fs::F_FREQ},
      {"F_PRES", fs::F_PRES},
      {"F_REP", fs::F_REP},
      {"F_MIRO_TAU", fs::F_MIRO_TAU},
      {"F_MIRO_ETA", fs::F_MIRO_ETA},
      {"F_EPSILON", fs::F_EPSILON},
      {"F_ETA", fs::F_ETA},
      {"F_NSIGMA", fs::F_NSIGMA},
      {"F_XTC_P", fs::F_XTC_P},
      {"F_XTC_T", fs::F_XTC_T},
      {"F_DYN_RANGE", fs::F_DYN_RANGE},
      {"F_DYN_EXP", fs::F_DYN_EXP},
      {"NF", fs::NF},
      {"I_TOP_K", fs::I_TOP_K},
      {"I_MIN_KEEP", fs::I_MIN_KEEP},
      {"I_MIRO_MODE", fs::I_MIRO_MODE},
      {"I_MIN_TOKENS", fs::I_MIN_TOKENS},
      {"I_IGNORE_EOS", fs::I_IGNORE_EOS},
      {"I_LOGPROBS", fs::I_LOGPROBS},
      {"I_TOP_LOGPROBS", fs::I_TOP_LOGPROBS},
      {"I_LOGPROBS_MODE", fs::I_LOGPROBS_MODE},
      {"NI", fs::NI},
      {"MODE_RAW", fs::MODE_RAW},
      {"MODE_PROCESSED", fs::MODE_PROCESSED},
      {"MODE_FINAL", fs::MODE_FINAL},
      {"TILE", fs::kTile},
      {"MIROSTAT_M", fs::kMirostatM},
      {"MAX_TOP_LOGPROBS", fs::kMaxTopLogprobs},
      {"COUNT_MAX", fs::kCountMax},
      {"STREAM_XTC", fs::kStreamXtc},
  };
  for (const auto& [name, value] : entries) layout[name] = value;
  m.attr("LAYOUT") = layout;
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 0) fail("num_threads must be >= 0 (0: all cores), got " + std::to_string(n));
        g_threads = n;
      },
      py::arg("n"));
  m.def("get_num_threads", []() {
    const int g = g_threads.load();
    return g > 0 ? g : default_threads();
  });
  m.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("cpu_features", &cpu_features,
        "{'avx512': bool, 'avx2': bool, 'portable': True}: the SIMD paths this CPU runs (x86-64-v4, x86-64-v3).");
  m.def("simd", []() {
#if defined(FASTSAMPLER_AVX512)
    return std::string("avx512");
#elif defined(FASTSAMPLER_AVX2)
    return std::string("avx2");
#else
    return std::string("portable");
#endif
  });
  m.def(
      "philox4x32_10",
      [](uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
        const uint32_t ctr[4] = {c0, c1, c2, c3};
        uint32_t out[4];
        fs::philox4x32_10({k0, k1}, ctr, out);
        return py::make_tuple(out[0], out[1], out[2], out[3]);
      },
      "Philox4x32-10 (Random123) of one counter block, for tests.");
  m.def(
      "neg_log_noise",
      [](uint64_t seed, uint32_t step, uint32_t seq, uint32_t stream, uint32_t c0base) {
        py::array_t<float> out(64);
        fs::neg_log_noise64({static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}, c0base, step, seq, stream,
                            out.mutable_data());
        return out;
      },
      "-ln E of the 64 variates j = 4 * c0base .. 4 * c0base + 63 (float32 vector path), for "
      "tests.");
  m.def(
      "neg_log_noise_bound",
      [](py::array_t<uint32_t, py::array::c_style | py::array::forcecast> words) {
        const int64_t n = words.size();
        py::array_t<float> noise(n), bound(n);
        py::array_t<double> bound64(n);
        const uint32_t* w = words.data();
        float* pn = noise.mutable_data();
        float* pb = bound.mutable_data();
        double* pd = bound64.mutable_data();
        for (int64_t i = 0; i < n; i += fs::simd::kLanes) {
          alignas(64) uint32_t buf[fs::simd::kLanes] = {0};
          alignas(64) float o1[fs::simd::kLanes], o2[fs::simd::kLanes];
          const int64_t m = std::min<int64_t>(fs::simd::kLanes, n - i);
          for (int64_t l = 0; l < m; ++l) buf[l] = w[i + l];
          const fs::simd::vu v = fs::simd::uload(buf);
          fs::simd::store(o1, fs::neg_log_noise16(v));
          fs::simd::store(o2, fs::neg_log_noise_bound16(v));
          for (int64_t l = 0; l < m; ++l) {
            pn[i + l] = o1[l];
            pb[i + l] = o2[l];
            pd[i + l] = fs::neg_log_noise_bound(w[i + l]);
          }
        }
        return py::make_tuple(noise, bound, bound64);
      },
      py::arg("words"),
      "(-ln E float32 vector path, its bound float32 vector path, the bound float64) of each "
      "32-bit word, for tests.");
}

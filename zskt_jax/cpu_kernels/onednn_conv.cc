// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI custom calls (jax.ffi).
//
// Layouts are JAX's: activations NHWC, kernels HWIO. Three targets, each one oneDNN primitive:
//   zskt_onednn_conv_forward       (x, w)   -> y
//   zskt_onednn_conv_backward_data (dy, w)  -> dx
//   zskt_onednn_conv_backward_weights (x, dy) -> dw
// Attributes: strides [2], padding [4] = (top, bottom, left, right). float32 or bfloat16
// buffers (all of one call's buffers share the dtype). oneDNN picks the kernel layout it
// computes fastest with; the kernel is reordered from and to HWIO around each call.
// Built by zskt_jax/onednn.py; see docs/performance.md.
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;
  memory::data_type type;
};

ffi::Error MakeGeometry(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                        Geometry* g) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || strides.size() != 2 ||
      padding.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: 4-D NHWC/HWIO buffers, 2 strides, 4 pads");
  }
  if (x.element_type() != w.element_type() || x.element_type() != y.element_type()) {
    return ffi::Error::InvalidArgument("onednn conv: buffers of different dtypes");
  }
  if (x.element_type() == ffi::DataType::F32) {
    g->type = memory::data_type::f32;
  } else if (x.element_type() == ffi::DataType::BF16) {
    g->type = memory::data_type::bf16;
  } else {
    return ffi::Error::InvalidArgument("onednn conv: float32 or bfloat16 only");
  }
  // oneDNN's logical orders: activations (N, C, H, W), kernels (O, I, H, W).
  g->src = {xd[0], xd[3], xd[1], xd[2]};
  g->weights = {wd[3], wd[2], wd[0], wd[1]};
  g->dst = {yd[0], yd[3], yd[1], yd[2]};
  g->strides = {strides[0], strides[1]};
  g->pad_l = {padding[0], padding[2]};
  g->pad_r = {padding[1], padding[3]};
  return ffi::Error::Success();
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(g.src, g.type, tag::nhwc), memory::desc(g.weights, g.type, tag::any),
      memory::desc(g.dst, g.type, tag::nhwc), g.strides, g.pad_l, g.pad_r);
}

// A backward primitive's descriptor (convolution_backward_data or _weights: the same
// arguments), with the forward one as its hint.
template <typename PrimitiveDesc>
PrimitiveDesc BackwardDesc(const Geometry& g) {
  return PrimitiveDesc(Engine(), dnnl::algorithm::convolution_direct,
                       memory::desc(g.src, g.type, tag::nhwc),
                       memory::desc(g.weights, g.type, tag::any),
                       memory::desc(g.dst, g.type, tag::nhwc), g.strides, g.pad_l, g.pad_r,
                       ForwardDesc(g));
}

// Runs `body` and turns a oneDNN exception into an XLA error (never a crash of the process).
template <typename Body>
ffi::Error Guard(const char* what, Body body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(what) + ": oneDNN: " + e.what());
  }
  return ffi::Error::Success();
}

// A kernel buffer in HWIO as oneDNN memory, reordered into a new buffer of layout `wanted`
// when that differs.
memory KernelIn(const Geometry& g, void* data, const memory::desc& wanted, dnnl::stream& s) {
  memory user(memory::desc(g.weights, g.type, tag::hwio), Engine(), data);
  if (wanted == user.get_desc()) return user;
  memory converted(wanted, Engine());
  dnnl::reorder(user, converted).execute(s, user, converted);
  return converted;
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto e = MakeGeometry(x, w, *y, strides, padding, &g); e.failure()) return e;
  return Guard("forward", [&] {
    dnnl::stream s(Engine());
    auto pd = ForwardDesc(g);
    memory src(pd.src_desc(), Engine(), x.untyped_data());
    memory dst(pd.dst_desc(), Engine(), y->untyped_data());
    memory weights = KernelIn(g, w.untyped_data(), pd.weights_desc(), s);
    dnnl::convolution_forward(pd).execute(
        s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
    s.wait();
  });
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto e = MakeGeometry(*dx, w, dy, strides, padding, &g); e.failure()) return e;
  return Guard("input gradient", [&] {
    dnnl::stream s(Engine());
    auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g);
    memory diff_dst(pd.diff_dst_desc(), Engine(), dy.untyped_data());
    memory diff_src(pd.diff_src_desc(), Engine(), dx->untyped_data());
    memory weights = KernelIn(g, w.untyped_data(), pd.weights_desc(), s);
    dnnl::convolution_backward_data(pd).execute(
        s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights},
            {DNNL_ARG_DIFF_SRC, diff_src}});
    s.wait();
  });
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto e = MakeGeometry(x, *dw, dy, strides, padding, &g); e.failure()) return e;
  return Guard("kernel gradient", [&] {
    dnnl::stream s(Engine());
    auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g);
    memory src(pd.src_desc(), Engine(), x.untyped_data());
    memory diff_dst(pd.diff_dst_desc(), Engine(), dy.untyped_data());
    memory user(memory::desc(g.weights, g.type, tag::hwio), Engine(), dw->untyped_data());
    memory diff_weights = pd.diff_weights_desc() == user.get_desc()
                              ? user : memory(pd.diff_weights_desc(), Engine());
    dnnl::convolution_backward_weights(pd).execute(
        s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
            {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
    if (diff_weights != user) dnnl::reorder(diff_weights, user).execute(s, diff_weights, user);
    s.wait();
  });
}

}  // namespace

// Every target: two buffers in, one out, and the strides and padding.
#define ZSKT_CONV_BINDING                          \
  ffi::Ffi::Bind()                                 \
      .Arg<ffi::AnyBuffer>()                       \
      .Arg<ffi::AnyBuffer>()                       \
      .Ret<ffi::AnyBuffer>()                       \
      .Attr<ffi::Span<const int64_t>>("strides")   \
      .Attr<ffi::Span<const int64_t>>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(zskt_onednn_conv_forward, Forward, ZSKT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(zskt_onednn_conv_backward_data, BackwardData, ZSKT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(zskt_onednn_conv_backward_weights, BackwardWeights,
                              ZSKT_CONV_BINDING);

// The oneDNN version this library runs, for the log line of zskt_jax/onednn.py.
extern "C" int zskt_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

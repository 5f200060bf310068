// The model kernels' N-API functions (linear, gatherRows, rmsNorm, rotary,
// siluMul, argmax) under the addon's `kernels`: lib/model-ops.ts checks and
// flattens each call; this file only converts and forwards.
#include <string>

#include "binding/js_values.h"
#include "binding/kernels_binding.h"
#include "common/errors.h"
#include "common/lifetime.h"
#include "kernels/decode_attention.h"
#include "kernels/linear.h"
#include "kernels/model_ops.h"

namespace vat {

namespace {

bool isBf16(const Napi::Object& o) { return o.Get("dtype").As<Napi::String>().Utf8Value() == "bfloat16"; }

// Checks `c`, then makes the call's device current and runs `queue`; no
// driver call once the process exits.
template <typename C, typename Check, typename Queue>
void forward(const Napi::CallbackInfo& info, const C& c, Check checkCall, Queue queue) {
  guarded(info.Env(), [&] {
    checkCall(c);
    if (processExiting()) fail(ErrorCode::Closed, "model kernels: the process is exiting");
    kernels::useDevice(static_cast<int>(u32(info[0])));
    queue(c);
  });
}

void Linear(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::LinearCall c;
  c.dtype = isBf16(o) ? kernels::ActivationDtype::BFloat16 : kernels::ActivationDtype::Float16;
  c.outputFloat32 = o.Get("outputFloat32").ToBoolean();
  c.rows = u32(o.Get("rows"));
  c.inFeatures = u32(o.Get("inFeatures"));
  c.outFeatures = u32(o.Get("outFeatures"));
  c.input = u64(o.Get("input"));
  c.weight = u64(o.Get("weight"));
  c.output = u64(o.Get("output"));
  c.stream = u64(o.Get("stream"));
  forward(info, c, kernels::checkLinear, kernels::linear);
}

void GatherRows(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::GatherRowsCall c;
  c.rows = u32(o.Get("rows"));
  c.tableRows = u32(o.Get("tableRows"));
  c.width = u32(o.Get("width"));
  c.table = u64(o.Get("table"));
  c.ids = u64(o.Get("ids"));
  c.out = u64(o.Get("out"));
  c.stream = u64(o.Get("stream"));
  forward(info, c, kernels::checkGatherRows, kernels::gatherRows);
}

void RmsNorm(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::RmsNormCall c;
  c.bf16 = isBf16(o);
  c.rows = u32(o.Get("rows"));
  c.width = u32(o.Get("width"));
  c.eps = o.Get("eps").As<Napi::Number>().FloatValue();
  c.x = u64(o.Get("x"));
  c.residual = u64(o.Get("residual"));
  c.weight = u64(o.Get("weight"));
  c.out = u64(o.Get("out"));
  c.stream = u64(o.Get("stream"));
  forward(info, c, kernels::checkRmsNorm, kernels::rmsNorm);
}

void Rotary(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::RotaryCall c;
  c.bf16 = isBf16(o);
  c.rows = u32(o.Get("rows"));
  c.qHeads = u32(o.Get("qHeads"));
  c.kvHeads = u32(o.Get("kvHeads"));
  c.headDim = u32(o.Get("headDim"));
  c.qkv = u64(o.Get("qkv"));
  c.positions = u64(o.Get("positions"));
  c.frequencies = u64(o.Get("frequencies"));
  c.q = u64(o.Get("q"));
  c.k = u64(o.Get("k"));
  c.v = u64(o.Get("v"));
  c.stream = u64(o.Get("stream"));
  forward(info, c, kernels::checkRotary, kernels::rotary);
}

void SiluMul(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::SiluMulCall c;
  c.bf16 = isBf16(o);
  c.rows = u32(o.Get("rows"));
  c.width = u32(o.Get("width"));
  c.gateUp = u64(o.Get("gateUp"));
  c.out = u64(o.Get("out"));
  c.stream = u64(o.Get("stream"));
  forward(info, c, kernels::checkSiluMul, kernels::siluMul);
}

void Argmax(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::ArgmaxCall c;
  c.rows = u32(o.Get("rows"));
  c.vocab = u32(o.Get("vocab"));
  c.stride = u64(o.Get("stride"));
  c.temperature = o.Get("temperature").As<Napi::Number>().FloatValue();
  c.seed = u64(o.Get("seed"));
  c.logits = u64(o.Get("logits"));
  c.out = u64(o.Get("out"));
  c.stream = u64(o.Get("stream"));
  forward(info, c, kernels::checkArgmax, kernels::argmax);
}

// { loaded, detail }: the library's name, or why it did not load. Needs no GPU.
Napi::Value CublasLt(const Napi::CallbackInfo& info) {
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("loaded", kernels::cublasLtLoaded());
  r.Set("detail", kernels::cublasLtStatus());
  return r;
}

}  // namespace

void addModelOps(Napi::Env env, Napi::Object kernels) {
  kernels.Set("linear", Napi::Function::New<Linear>(env));
  kernels.Set("gatherRows", Napi::Function::New<GatherRows>(env));
  kernels.Set("rmsNorm", Napi::Function::New<RmsNorm>(env));
  kernels.Set("rotary", Napi::Function::New<Rotary>(env));
  kernels.Set("siluMul", Napi::Function::New<SiluMul>(env));
  kernels.Set("argmax", Napi::Function::New<Argmax>(env));
  kernels.Set("cublasLt", Napi::Function::New<CublasLt>(env));
}

}  // namespace vat

#include "binding/kernels_binding.h"

#include <string>

#include "binding/js_values.h"
#include "common/errors.h"
#include "common/lifetime.h"
#include "kernels/decode_attention.h"
#include "kernels/linear.h"

namespace vat {

namespace {

using kernels::KVDtype;
using kernels::QueryDtype;

KVDtype kvDtype(const Napi::Value& v) {
  const std::string name = v.As<Napi::String>().Utf8Value();
  return name == "bfloat16" ? KVDtype::BFloat16 : name == "float8_e4m3" ? KVDtype::Float8E4M3 : KVDtype::Float16;
}
QueryDtype queryDtype(const Napi::Value& v) {
  return v.As<Napi::String>().Utf8Value() == "bfloat16" ? QueryDtype::BFloat16 : QueryDtype::Float16;
}
float f32(const Napi::Value& v) { return v.As<Napi::Number>().FloatValue(); }
int64_t i64(const Napi::Value& v) { return v.As<Napi::Number>().Int64Value(); }

kernels::CacheAddressing cacheFrom(const Napi::Object& o) {
  kernels::CacheAddressing c;
  c.paged = o.Get("paged").ToBoolean();
  c.k = u64(o.Get("k"));
  c.v = u64(o.Get("v"));
  c.rows = u64(o.Get("rows"));
  c.rowStride = i64(o.Get("rowStride"));
  c.tokenStride = i64(o.Get("tokenStride"));
  c.headStride = i64(o.Get("headStride"));
  c.maxBlocksPerSequence = u32(o.Get("maxBlocksPerSequence"));
  c.blockSize = u32(o.Get("blockSize"));
  c.kScale = f32(o.Get("kScale"));
  c.vScale = f32(o.Get("vScale"));
  c.kScales = u64(o.Get("kScales"));
  c.vScales = u64(o.Get("vScales"));
  return c;
}

kernels::DecodeAttentionCall decodeCallFrom(const Napi::Value& value) {
  Napi::Object o = value.As<Napi::Object>();
  kernels::DecodeAttentionCall c;
  c.dtype = kvDtype(o.Get("dtype"));
  c.queryDtype = queryDtype(o.Get("queryDtype"));
  c.batch = u32(o.Get("batch"));
  c.qHeads = u32(o.Get("qHeads"));
  c.kvHeads = u32(o.Get("kvHeads"));
  c.headDim = u32(o.Get("headDim"));
  c.maxLength = u32(o.Get("maxLength"));
  c.longestLength = u32(o.Get("longestLength"));
  c.splits = u32(o.Get("splits"));
  c.window = u32(o.Get("window"));
  c.scale = f32(o.Get("scale"));
  c.softcap = f32(o.Get("softcap"));
  c.stream = u64(o.Get("stream"));
  c.q = u64(o.Get("q"));
  c.out = u64(o.Get("out"));
  c.lengths = u64(o.Get("lengths"));
  c.queryTokens = u32(o.Get("queryTokens"));
  c.counts = u64(o.Get("counts"));
  c.cache = cacheFrom(o);
  c.workspace.address = u64(o.Get("workspace"));
  c.workspace.bytes = u64(o.Get("workspaceBytes"));
  return c;
}

Napi::Value planObject(Napi::Env env, const kernels::DecodeAttentionPlan& plan) {
  Napi::Object r = Napi::Object::New(env);
  r.Set("splits", plan.splits);
  r.Set("tokensPerSplit", plan.tokensPerSplit);
  r.Set("headsPerBlock", plan.headsPerBlock);
  r.Set("workspaceBytes", num(env, plan.workspaceBytes));
  return r;
}

// The device to run on, made current; no driver call once the process exits.
int device(const Napi::CallbackInfo& info) {
  if (processExiting()) fail(ErrorCode::Closed, "attention kernels: the process is exiting");
  return static_cast<int>(u32(info[0]));
}

// Every argument check runs before the device is touched: a bad call is a
// coded error even where no driver is loaded.
Napi::Value DecodeAttention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const kernels::DecodeAttentionCall c = decodeCallFrom(info[1]);
  return planObject(env, guarded(env, [&] {
                      kernels::checkDecodeAttention(c);
                      kernels::useDevice(device(info));
                      return kernels::decodeAttention(c);
                    }));
}

Napi::Value PlanDecodeAttention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const kernels::DecodeAttentionCall c = decodeCallFrom(info[1]);
  return planObject(env, guarded(env, [&] {
                      kernels::checkDecodeAttention(c);
                      kernels::useDevice(device(info));
                      return kernels::planDecodeAttention(c);
                    }));
}

void AppendKV(const Napi::CallbackInfo& info) {
  Napi::Object o = info[1].As<Napi::Object>();
  kernels::AppendKVCall c;
  c.dtype = kvDtype(o.Get("dtype"));
  c.queryDtype = queryDtype(o.Get("queryDtype"));
  c.batch = u32(o.Get("batch"));
  c.newTokens = u32(o.Get("newTokens"));
  c.kvHeads = u32(o.Get("kvHeads"));
  c.headDim = u32(o.Get("headDim"));
  c.maxLength = u32(o.Get("maxLength"));
  c.stream = u64(o.Get("stream"));
  c.kNew = u64(o.Get("kNew"));
  c.vNew = u64(o.Get("vNew"));
  c.positions = u64(o.Get("positions"));
  c.counts = u64(o.Get("counts"));
  c.cache = cacheFrom(o);
  guarded(info.Env(), [&] {
    kernels::checkAppendKV(c);
    kernels::useDevice(device(info));
    kernels::appendKV(c);
  });
}

Napi::Value AllocateWorkspace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return big(env, guarded(env, [&] {
               kernels::useDevice(device(info));
               return kernels::allocateWorkspace(u64(info[1]));
             }));
}

void FreeWorkspace(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] {
    kernels::useDevice(device(info));
    kernels::freeWorkspace(u64(info[1]));
  });
}

// What the kernels keep for a stream (decodeAttention's default workspace,
// linear's cuBLASLt handle, workspace and plans) goes; true when there was
// any. Nothing kept at all: no driver call (a machine without CUDA).
Napi::Value ReleaseStream(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Napi::Boolean::New(env, guarded(env, [&] {
                              if (!kernels::attentionKeepsStreams() && !kernels::linearKeepsStreams()) return false;
                              kernels::useDevice(device(info));
                              const uint64_t stream = u64(info[1]);
                              bool attention = kernels::releaseAttentionStream(stream);
                              bool linear = kernels::releaseLinearStream(stream);
                              return attention || linear;
                            }));
}

}  // namespace

void addKernels(Napi::Env env, Napi::Object exports) {
  Napi::Object k = Napi::Object::New(env);
  k.Set("decodeAttention", Napi::Function::New<DecodeAttention>(env));
  k.Set("planDecodeAttention", Napi::Function::New<PlanDecodeAttention>(env));
  k.Set("appendKV", Napi::Function::New<AppendKV>(env));
  k.Set("allocateWorkspace", Napi::Function::New<AllocateWorkspace>(env));
  k.Set("freeWorkspace", Napi::Function::New<FreeWorkspace>(env));
  k.Set("releaseStream", Napi::Function::New<ReleaseStream>(env));
  addModelOps(env, k);
  exports.Set("kernels", k);
}

}  // namespace vat

// The cache's layout as JS reads it once at construction (lib/native.ts
// NativeLayout): bases per device, page and token sizes, every tensor's view.
#pragma once

#include <napi.h>

#include "binding/js_values.h"
#include "core/kv_cache.h"

namespace vat {

inline Napi::Value layoutObject(Napi::Env env, KVCache& cache) {
  const KVLayout& l = cache.layout();
  const ModelShape& shape = l.shape();
  Napi::Object o = Napi::Object::New(env);
  const CacheDescription& d = cache.description();
  o.Set("base", big(env, d.bases[0]));
  Napi::Array bases = Napi::Array::New(env, cache.deviceCount());
  Napi::Array ordinals = Napi::Array::New(env, cache.deviceCount());
  for (uint32_t i = 0; i < cache.deviceCount(); ++i) {
    bases.Set(i, big(env, d.bases[i]));
    ordinals.Set(i, cache.deviceOrdinal(i));
  }
  o.Set("bases", bases);
  o.Set("devices", ordinals);
  o.Set("pageSize", num(env, d.pageSize));
  o.Set("granularity", num(env, d.granularity));
  o.Set("backend", d.backend);
  o.Set("tokenBytes", num(env, l.tokenBytes()));
  o.Set("bytesPerToken", num(env, l.bytesPerToken()));
  o.Set("pagesPerGroup", num(env, l.pagesPerGroup()));
  o.Set("layout", l.name());
  o.Set("layerGroups", num(env, l.layerGroups()));
  o.Set("tokenPitch", num(env, l.tokenPitch()));
  o.Set("rangeBytes", num(env, l.rangeBytes()));
  Napi::Array tensors = Napi::Array::New(env);
  uint32_t n = 0;
  for (uint32_t layer = 0; layer < shape.layers; ++layer) {
    for (KVKind kind : {KVKind::K, KVKind::V}) {
      TensorView v = l.tensor(layer, kind);
      Napi::Object t = Napi::Object::New(env);
      t.Set("offset", big(env, v.offset));
      Napi::Array strides = Napi::Array::New(env, 4);
      for (uint32_t d = 0; d < 4; ++d) strides.Set(d, num(env, v.strideElements[d]));
      t.Set("strideElements", strides);
      tensors.Set(n++, t);
    }
  }
  o.Set("tensors", tensors);
  return o;
}

}  // namespace vat

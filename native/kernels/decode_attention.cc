#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "common/errors.h"
#include "driver/cuda_driver.h"
#include "kernels/argument_checks.h"
#include "kernels/kernel_modules.h"

namespace vat::kernels {

using namespace cu;

namespace {

// The default workspace of one stream: partial results of its calls only,
// so calls on different streams never share scratch. Its lock is held from
// the size check through the launch: a growth on one thread cannot free
// what another is about to launch with on the same stream.
struct StreamWorkspace {
  std::mutex lock;
  CUdeviceptr address = 0;
  uint64_t bytes = 0;
};

// Entries are never erased (a caller may hold one between the lookup and
// its lock); a release frees the buffer and leaves the empty entry.
struct StreamWorkspaces {
  std::mutex lock;
  std::map<std::pair<CUcontext, uint64_t>, std::unique_ptr<StreamWorkspace>> byStream;
};

StreamWorkspaces& workspaces() {
  static auto* w = new StreamWorkspaces();  // never destroyed: no driver work at exit
  return *w;
}

StreamWorkspace& streamWorkspace(CUcontext context, uint64_t stream) {
  StreamWorkspaces& all = workspaces();
  std::lock_guard<std::mutex> guard(all.lock);
  auto& slot = all.byStream[{context, stream}];
  if (!slot) slot = std::make_unique<StreamWorkspace>();
  return *slot;
}

// Grows `w` (its lock held) to `bytes`. The stream's earlier calls may still
// use the old buffer: wait for them (only when growing, never per call). A
// stream being captured cannot wait.
void grow(StreamWorkspace& w, uint64_t bytes, CUstream stream) {
  const DriverApi& d = driver();
  int capture = 0;
  check(d.cuStreamIsCapturing(stream, &capture), "cuStreamIsCapturing");
  if (capture != CU_STREAM_CAPTURE_STATUS_NONE)
    fail(ErrorCode::InvalidArgument,
         "decodeAttention: the stream's workspace must grow to " + std::to_string(bytes) +
             " bytes while the stream is being captured; pass a workspace, or make the same call once before "
             "capturing");
  if (w.address) {
    check(d.cuStreamSynchronize(stream), "cuStreamSynchronize");
    check(d.cuMemFree(w.address), "cuMemFree");
    w.address = 0;
    w.bytes = 0;
  }
  check(d.cuMemAlloc(&w.address, bytes), "cuMemAlloc");
  w.bytes = bytes;
}

DecodeAttentionPlan planFor(const DecodeAttentionCall& c, const Functions* f) {
  DecodeAttentionPlan plan;
  const uint32_t group = c.qHeads / c.kvHeads;
  plan.headsPerBlock = std::min<uint32_t>(group, kHeadsPerBlock);
  const uint64_t chunks = (group + kHeadsPerBlock - 1) / kHeadsPerBlock;
  const Tiling tiling = tilingFor(static_cast<int>(c.headDim), elementBytes(c.dtype));
  uint64_t live = c.longestLength ? c.longestLength : c.maxLength;
  if (c.window) live = std::min<uint64_t>(live, c.window);
  uint64_t splits = c.queryTokens > 1 ? 1 : c.splits;
  if (splits == 0) {
    splits = 1;
    const uint64_t blocks = uint64_t{c.batch} * c.kvHeads * chunks;
    const uint64_t slots = f ? uint64_t(f->multiprocessors) * std::max(1, f->blocksPerMultiprocessor) : 1;
    // No split shorter than 4 tiles (the pipeline's prologue), none past 64
    // (the reduce walks them one by one).
    const uint64_t most = std::min<uint64_t>(64, std::max<uint64_t>(1, live / (4 * tiling.blockTokens)));
    // FlashAttention's rule: do not split a grid that already fills 80% of
    // the slots; else the fewest splits whose last wave is within 85% of the
    // best wave efficiency.
    if (live > 0 && blocks * 10 < slots * 8 && most > 1) {
      auto efficiency = [&](uint64_t s) {
        double waves = double(blocks * s) / double(slots);
        return waves / std::ceil(waves);
      };
      double best = 0;
      for (uint64_t s = 1; s <= most; s++) best = std::max(best, efficiency(s));
      for (uint64_t s = 1; s <= most; s++)
        if (efficiency(s) >= 0.85 * best) {
          splits = s;
          break;
        }
    }
  }
  plan.splits = static_cast<uint32_t>(splits);
  uint64_t tokens = (live + splits - 1) / splits;
  plan.tokensPerSplit = static_cast<uint32_t>((tokens + tiling.blockTokens - 1) / tiling.blockTokens * tiling.blockTokens);
  plan.workspaceBytes = splits > 1 ? uint64_t{c.batch} * c.qHeads * splits * (c.headDim + 2) * sizeof(float) : 0;
  return plan;
}

AttentionParams paramsFor(const DecodeAttentionCall& c, const DecodeAttentionPlan& plan) {
  AttentionParams p{};
  p.q = c.q;
  p.k = c.cache.k;
  p.v = c.cache.v;
  p.out = c.out;
  p.lengths = c.lengths;
  p.rows = c.cache.rows;
  p.kScales = c.cache.kScales;
  p.vScales = c.cache.vScales;
  p.rowStride = c.cache.rowStride;
  p.tokenStride = c.cache.tokenStride;
  p.headStride = c.cache.headStride;
  p.paged = c.cache.paged ? 1 : 0;
  p.maxBlocksPerSequence = static_cast<int>(c.cache.maxBlocksPerSequence);
  p.blockSize = static_cast<int>(c.cache.blockSize);
  p.qHeads = static_cast<int>(c.qHeads);
  p.kvHeads = static_cast<int>(c.kvHeads);
  p.group = static_cast<int>(c.qHeads / c.kvHeads);
  p.queryChunks = (p.group + kHeadsPerBlock - 1) / kHeadsPerBlock;
  p.splits = static_cast<int>(plan.splits);
  p.window = static_cast<int>(c.window);
  p.scale = c.scale > 0.f ? c.scale : 1.f / std::sqrt(static_cast<float>(c.headDim));
  p.softcap = c.softcap;
  p.kScale = c.cache.kScale;
  p.vScale = c.cache.vScale;
  p.queryBf16 = c.queryDtype == QueryDtype::BFloat16 ? 1 : 0;
  p.queryTokens = static_cast<int>(c.queryTokens);
  p.tokensPerBlock = kHeadsPerBlock / std::min(p.group, kHeadsPerBlock);
  p.counts = c.counts;
  return p;
}

void launch(const DecodeAttentionCall& c, const Functions& f, const DecodeAttentionPlan& plan, uint64_t workspace) {
  AttentionParams p = paramsFor(c, plan);
  if (plan.splits > 1) {
    p.partialAcc = workspace;
    p.partialMaxSum = workspace + uint64_t{c.batch} * c.qHeads * plan.splits * c.headDim * sizeof(float);
  }
  const DriverApi& d = driver();
  CUstream stream = reinterpret_cast<CUstream>(c.stream);
  void* args[] = {&p};
  const int shared = attentionSharedBytes(static_cast<int>(c.headDim), elementBytes(c.dtype));
  if (c.queryTokens > 1) {
    const uint64_t tokenChunks = (c.queryTokens + p.tokensPerBlock - 1) / p.tokensPerBlock;
    if (tokenChunks * p.queryChunks > 0x7fffffffu) invalid("prefillAttention", "too many query tokens for one call");
    check(d.cuLaunchKernel(f.prefill, static_cast<unsigned>(tokenChunks * p.queryChunks), c.kvHeads, c.batch,
                           kAttentionThreads, 1, 1, shared, stream, args, nullptr),
          "cuLaunchKernel");
    return;
  }
  check(d.cuLaunchKernel(f.partial, plan.splits * p.queryChunks, c.kvHeads, c.batch,
                         kAttentionThreads, 1, 1, shared, stream, args, nullptr),
        "cuLaunchKernel");
  if (plan.splits > 1)
    check(d.cuLaunchKernel(f.reduce, c.qHeads, c.batch, 1, c.headDim, 1, 1, 0, stream, args, nullptr),
          "cuLaunchKernel");
}

}  // namespace

void checkDecodeAttention(const DecodeAttentionCall& c) {
  const char* what = "decodeAttention";
  checkTypes(what, c.dtype, c.queryDtype, c.headDim);
  if (c.batch == 0 || c.batch > 65535) invalid(what, "batch must be between 1 and 65535");
  if (c.kvHeads == 0 || c.kvHeads > 65535 || c.qHeads == 0 || c.qHeads > 65535)
    invalid(what, "qHeads and kvHeads must be between 1 and 65535");
  if (c.qHeads % c.kvHeads != 0)
    invalid(what, "qHeads must be a multiple of kvHeads, got " + std::to_string(c.qHeads) + " / " +
                      std::to_string(c.kvHeads));
  if (c.maxLength > 0x7fffffffu) invalid(what, "maxLength must be below 2^31");
  if (c.longestLength > c.maxLength)
    invalid(what, "a live length (" + std::to_string(c.longestLength) + ") is above maxLength (" +
                      std::to_string(c.maxLength) + ")");
  if (c.splits > 65535) invalid(what, "splits must be at most 65535");
  if (c.queryTokens == 0 || c.queryTokens > 0x7fffffffu) invalid(what, "queryTokens must be at least 1");
  if (c.queryTokens > 1 && c.splits > 1) invalid(what, "prefill runs in one split");
  if (c.counts % 4 != 0) invalid(what, "counts must be an int32 device array");
  if (!(c.scale >= 0.f) || !std::isfinite(c.scale)) invalid(what, "scale must be a positive number");
  if (!(c.softcap >= 0.f) || !std::isfinite(c.softcap)) invalid(what, "softcap must be a positive number");
  checkAligned(what, "q", c.q, 16);
  checkAligned(what, "out", c.out, 16);
  checkAligned(what, "lengths", c.lengths, 4);
  checkCache(what, c.dtype, c.cache, c.maxLength);
  if (c.workspace.address % 16 != 0) invalid(what, "workspace must be a 16-byte aligned device address");
}

DecodeAttentionPlan planDecodeAttention(const DecodeAttentionCall& c) {
  checkDecodeAttention(c);
  return planFor(c, &functionsFor(c.dtype, c.headDim));
}

DecodeAttentionPlan decodeAttention(const DecodeAttentionCall& c) {
  checkDecodeAttention(c);
  const Functions& f = functionsFor(c.dtype, c.headDim);
  const DecodeAttentionPlan plan = planFor(c, &f);
  if (c.workspace.address) {
    if (c.workspace.bytes < plan.workspaceBytes)
      invalid("decodeAttention", "the workspace holds " + std::to_string(c.workspace.bytes) +
                                     " bytes; this call needs " + std::to_string(plan.workspaceBytes) +
                                     " (planDecodeAttention gives it)");
    launch(c, f, plan, c.workspace.address);
    return plan;
  }
  if (plan.workspaceBytes == 0) {
    launch(c, f, plan, 0);
    return plan;
  }
  StreamWorkspace& w = streamWorkspace(currentContext(), c.stream);
  std::lock_guard<std::mutex> guard(w.lock);
  if (w.bytes < plan.workspaceBytes) grow(w, plan.workspaceBytes, reinterpret_cast<CUstream>(c.stream));
  launch(c, f, plan, w.address);
  return plan;
}

bool attentionKeepsStreams() {
  StreamWorkspaces& all = workspaces();
  std::lock_guard<std::mutex> guard(all.lock);
  return !all.byStream.empty();
}

bool releaseAttentionStream(uint64_t stream) {
  StreamWorkspaces& all = workspaces();
  StreamWorkspace* w = nullptr;
  {
    std::lock_guard<std::mutex> guard(all.lock);
    auto it = all.byStream.find({currentContext(), stream});
    if (it == all.byStream.end()) return false;
    w = it->second.get();
  }
  std::lock_guard<std::mutex> guard(w->lock);
  if (!w->address) return false;
  // Its calls may still run: they write the workspace. A failed wait keeps it.
  check(driver().cuStreamSynchronize(reinterpret_cast<CUstream>(stream)), "cuStreamSynchronize");
  CUdeviceptr address = w->address;
  w->address = 0;
  w->bytes = 0;
  check(driver().cuMemFree(address), "cuMemFree");
  return true;
}

}  // namespace vat::kernels

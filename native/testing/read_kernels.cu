// Test kernels written in CUDA C. scripts/gen-ptx.sh compiles this file to
// PTX (read_kernels_ptx.cc), which the driver JIT-compiles at run time: users
// need no toolkit. The older kernels of kernels_ptx.cc are hand-written PTX.

// Spins until `nanoseconds` have passed on the GPU's global timer, then reads
// in[i] for i < count, every word, as an attention kernel reads the KV cache
// (volatile loads: none is skipped). A long kernel that reads late: if the
// memory is unmapped before it ends, it faults (CUDA_ERROR_ILLEGAL_ADDRESS).
// The sum goes to *sink only when `sink` is not null.
extern "C" __global__ void vat_spin_then_read_u32(const unsigned* in, unsigned long long count,
                                                  unsigned long long nanoseconds, unsigned* sink) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < nanoseconds);
  const volatile unsigned* words = in;
  unsigned sum = 0;
  unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long i = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride)
    sum += words[i];
  if (sink) atomicAdd(sink, sum);
}

// Counts the words of in[0, count) that differ from the pattern fillU32 writes
// (in[i] = i * 0x9E3779B1 + seed) into *mismatches: a reader that checks
// what it reads, for soak tests.
extern "C" __global__ void vat_check_fill_u32(const unsigned* in, unsigned long long count, unsigned seed,
                                              unsigned* mismatches) {
  unsigned bad = 0;
  unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long i = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride)
    bad += in[i] != static_cast<unsigned>(i) * 0x9E3779B1u + seed;
  if (bad) atomicAdd(mismatches, bad);
}

// Writes `rows` rows of `rowBytes` bytes (a multiple of 4), `stride` bytes
// apart, through a strided view of the cache: word w of row r gets
// (seed * 0x9E3779B1) ^ (r * 0x85EBCA6B) ^ w. One block per row.
extern "C" __global__ void vat_write_rows_u32(unsigned char* base, unsigned long long stride, unsigned long long rows,
                                              unsigned long long rowBytes, unsigned seed) {
  for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
    unsigned* row = reinterpret_cast<unsigned*>(base + r * stride);
    unsigned key = (seed * 0x9E3779B1u) ^ (static_cast<unsigned>(r) * 0x85EBCA6Bu);
    for (unsigned long long w = threadIdx.x; w < rowBytes / 4; w += blockDim.x) row[w] = key ^ static_cast<unsigned>(w);
  }
}

// The streaming-read ceiling the attention benchmark measures itself against:
// reads in[0, count) (uint4 words, count a multiple of 4 × the grid's
// threads is not needed) as fast as the GPU can, 4 independent 16-byte loads
// in flight per thread and iteration, through L2 only. The xor of what it
// read goes to *sink only if it equals `never` (it does not), so no load is
// optimised away and nothing is written.
extern "C" __global__ void __launch_bounds__(512) vat_stream_read(const uint4* in, unsigned long long count,
                                                                  unsigned never, unsigned* sink) {
  const unsigned long long threads = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  unsigned long long i = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * threads < count; i += 4 * threads) {
    uint4 a = __ldcg(in + i), b = __ldcg(in + i + threads), c = __ldcg(in + i + 2 * threads), d = __ldcg(in + i + 3 * threads);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < count; i += threads) {
    uint4 a = __ldcg(in + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == never) *sink = acc;
}

// PTX of the test/benchmark kernels, JIT-compiled by the driver at run time.
// Check it with: sed -n "/^R\"PTX(/,/^)PTX\"/p" native/testing/kernels_ptx.cc | sed "1d;\$d" > k.ptx && ptxas -arch=sm_90 k.ptx
namespace vat::testing {
extern const char kKernelsPtx[];
const char kKernelsPtx[] =
R"PTX(
//
// Kernels for tests and benchmarks, JIT-compiled by the driver (no nvcc at
// run time). Checked with `ptxas -arch=sm_90 native/testing/kernels.ptx`.
//
.version 7.0
.target sm_70
.address_size 64

// out[i] = i * 0x9E3779B1 + seed, for i < count (grid-stride loop)
.visible .entry vat_fill_u32(
    .param .u64 p_out,
    .param .u64 p_count,
    .param .u32 p_seed
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_count];
    ld.param.u32 %r1, [p_seed];
    cvta.to.global.u64 %rd1, %rd1;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mul.wide.u32 %rd3, %r2, %r3;
    cvt.u64.u32 %rd4, %r4;
    add.u64 %rd3, %rd3, %rd4;
    mov.u32 %r5, %nctaid.x;
    mul.wide.u32 %rd5, %r5, %r3;
FILL_LOOP:
    setp.ge.u64 %p1, %rd3, %rd2;
    @%p1 bra FILL_DONE;
    cvt.u32.u64 %r6, %rd3;
    mad.lo.u32 %r7, %r6, -1640531535, %r1;
    shl.b64 %rd6, %rd3, 2;
    add.u64 %rd7, %rd1, %rd6;
    st.global.u32 [%rd7], %r7;
    add.u64 %rd3, %rd3, %rd5;
    bra FILL_LOOP;
FILL_DONE:
    ret;
}

// Spins until `nanoseconds` have passed on the GPU's global timer, then
// out[i] = value for i < count: a long kernel that writes late.
.visible .entry vat_spin_fill_u32(
    .param .u64 p_out,
    .param .u64 p_count,
    .param .u32 p_value,
    .param .u64 p_nanos
)
{
    .reg .pred %p<3>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<12>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_count];
    ld.param.u32 %r1, [p_value];
    ld.param.u64 %rd8, [p_nanos];
    cvta.to.global.u64 %rd1, %rd1;
    mov.u64 %rd9, %globaltimer;
SPIN:
    mov.u64 %rd10, %globaltimer;
    sub.u64 %rd11, %rd10, %rd9;
    setp.lt.u64 %p2, %rd11, %rd8;
    @%p2 bra SPIN;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mul.wide.u32 %rd3, %r2, %r3;
    cvt.u64.u32 %rd4, %r4;
    add.u64 %rd3, %rd3, %rd4;
    mov.u32 %r5, %nctaid.x;
    mul.wide.u32 %rd5, %r5, %r3;
SPIN_FILL_LOOP:
    setp.ge.u64 %p1, %rd3, %rd2;
    @%p1 bra SPIN_FILL_DONE;
    shl.b64 %rd6, %rd3, 2;
    add.u64 %rd7, %rd1, %rd6;
    st.global.u32 [%rd7], %r1;
    add.u64 %rd3, %rd3, %rd5;
    bra SPIN_FILL_LOOP;
SPIN_FILL_DONE:
    ret;
}

// A decode step's KV write: block (b, t) writes one token of `tokenBytes`
// bytes into tensor t for batch entry b, at
//   base + t * tensorStride + slot_b * slotStride + token_b * tokenBytes
// where entries[b] = slot_b << 32 | token_b (up to 256 entries). Word i of
// the token gets seed ^ (b << 16) ^ i.
.visible .entry vat_write_tokens(
    .param .u64 p_base,
    .param .u64 p_tensor_stride,
    .param .u64 p_slot_stride,
    .param .u64 p_token_bytes,
    .param .u32 p_seed,
    .param .align 8 .b8 p_entries[2048]
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<20>;
    ld.param.u64 %rd1, [p_base];
    ld.param.u64 %rd2, [p_tensor_stride];
    ld.param.u64 %rd3, [p_slot_stride];
    ld.param.u64 %rd4, [p_token_bytes];
    ld.param.u32 %r1, [p_seed];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ctaid.y;
    mov.u64 %rd5, p_entries;
    mul.wide.u32 %rd6, %r2, 8;
    add.u64 %rd5, %rd5, %rd6;
    ld.param.u64 %rd7, [%rd5];
    shr.u64 %rd8, %rd7, 32;
    and.b64 %rd9, %rd7, 4294967295;
    mul.wide.u32 %rd10, %r3, 1;
    mul.lo.u64 %rd10, %rd10, %rd2;
    mul.lo.u64 %rd11, %rd8, %rd3;
    mul.lo.u64 %rd12, %rd9, %rd4;
    add.u64 %rd13, %rd1, %rd10;
    add.u64 %rd13, %rd13, %rd11;
    add.u64 %rd13, %rd13, %rd12;
    cvta.to.global.u64 %rd13, %rd13;
    shr.u64 %rd14, %rd4, 2;
    shl.b32 %r4, %r2, 16;
    xor.b32 %r5, %r1, %r4;
    mov.u32 %r6, %tid.x;
    mov.u32 %r7, %ntid.x;
    cvt.u64.u32 %rd15, %r6;
    cvt.u64.u32 %rd16, %r7;
WRITE_LOOP:
    setp.ge.u64 %p1, %rd15, %rd14;
    @%p1 bra WRITE_DONE;
    cvt.u32.u64 %r8, %rd15;
    xor.b32 %r9, %r5, %r8;
    shl.b64 %rd17, %rd15, 2;
    add.u64 %rd18, %rd13, %rd17;
    st.global.u32 [%rd18], %r9;
    add.u64 %rd15, %rd15, %rd16;
    bra WRITE_LOOP;
WRITE_DONE:
    ret;
}
)PTX";
}  // namespace vat::testing

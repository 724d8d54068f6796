// W1.58A8 kernels for packed ternary weights (BitNet b1.58 inference), C ABI for ctypes.
//
// Weight layout ("I2" as in bitnet.cpp's I2_S kernel, Wang et al. 2024, "1-bit AI Infra", §2):
// each output row holds K_pad = ceil(K / 128) * 128 codes c = q + 1 in {0, 1, 2}, 2 bits each.
// A 128-weight block is 32 bytes; bits [2i, 2i+1] of byte j hold the code of weight 32·i + j of
// the block, so one 32-byte load and four shift-and-mask steps give four vectors of 32 codes.
//
// y[m, n] = s_w[n] · s_x[m] · Σ_k q_x[m, k] · q_w[n, k], computed as
//   Σ_k c[n, k] · q_x[m, k] − Σ_k q_x[m, k]    (q_w = c − 1)
// Three paths, chosen when the library is compiled (`-march=native` on the machine that runs it,
// so each CPU gets the widest path it has; `qk_path()` names it):
// - avx512_vnni: `_mm512_dpbusd_epi32` (VPDPBUSD: four u8·s8 products summed into each int32 lane,
//   Intel SDM vol. 2C) on 64 codes at a time, straight into int32 (no int16 stage). Two 128-weight
//   blocks share one 64-byte load; the activations are re-laid once per call to match
//   (`interleave_pairs`), as ik_llama.cpp's iq2_bn_r4 AVX-512 path does with its own layout.
// - amx_int8 (the avx512_vnni build on CPUs with AMX, where Linux grants the tile state): groups of
//   ≥ AMX_MIN_ROWS activation rows run on AMX tiles (Intel SDM vol. 2, TDPBUSD: a 16×64 u8 tile times
//   a 64×16 s8 tile in VNNI layout, summed into a 16×16 int32 tile). A chunk of weight rows is decoded
//   once into u8 code tiles and meets every 16-row block of activations, re-laid once per call; rows
//   of fewer than AMX_MIN_ROWS (batch-1 decoding) keep the VPDPBUSD loop. Exact int32 sums either way.
// - avx2: `_mm256_maddubs_epi16` (unsigned codes × signed activations). |q_x| ≤ 127, so one
//   maddubs lane is at most 2·2·127 = 508 in magnitude and 32 of them fit in int16 before widening.
// - scalar: plain loops, for CPUs without AVX2.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <omp.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__) && defined(__AVX512VL__)
#define QK_VNNI 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define QK_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#if defined(QK_AMX)
// Linux hands out the 8 KiB AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, Documentation/arch/x86/xstate.rst), once per process; without it the first
// tile instruction faults, so a refusal keeps the VPDPBUSD path.
static bool amx_granted() {
    static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
}
#endif

extern "C" int qk_version() { return 2; }

// The path this build runs: "amx_int8", "avx512_vnni", "avx2" or "scalar".
extern "C" const char* qk_path() {
#if defined(QK_AMX)
    if (amx_granted()) return "amx_int8";
#endif
#if defined(QK_VNNI)
    return "avx512_vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

// 1 where this build has the AMX path but Linux refused the tile state (so qk_path() names a narrower one).
extern "C" int qk_amx_refused() {
#if defined(QK_AMX)
    return amx_granted() ? 0 : 1;
#else
    return 0;
#endif
}

// max_k |row[k]| over K floats (0 for K = 0). A NaN is skipped, as std::fmax skips it: the vector
// max returns its second operand (the running max) when the first is NaN. The scalar fmax loop this
// replaces was a libm call per element (no fast-math, so no vectorised max): on a Zen 4, 15 % of a
// K = N = 2048, M = 256 ternary call went to it.
static inline float row_absmax(const float* row, int64_t K) {
    float amax = 0.f;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) acc = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(row + k)), acc);
    amax = _mm512_reduce_max_ps(acc);
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) acc = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)), acc);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    for (float l : lanes) amax = std::fmax(amax, l);
#endif
    for (; k < K; ++k) amax = std::fmax(amax, std::fabs(row[k]));
    return amax;
}

// Per-token absmax quantization to int8 (BitNet §2), bit-identical to quillan.bitnet.activation_quantize:
// s = max(absmax, eps); q = clamp(round_half_even(x * ((1 / s) * 127)), -128, 127); scale = s / 127.
// xq is (M, K_pad) with the tail zeroed.
extern "C" void qk_quantize_rows(const float* x, int64_t M, int64_t K, int64_t K_pad, float eps, int8_t* xq, float* xs) {
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * K;
        float amax = row_absmax(row, K);
        amax = std::fmax(amax, eps);
        // PyTorch evaluates `127.0 / t` as reciprocal(t) * 127: two roundings, copied here for equal bits.
        const float inv = (1.0f / amax) * 127.0f;
        int8_t* out = xq + m * K_pad;
        int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        // The same float operations 16 at a time: the product, round half to even (the MXCSR
        // default, as nearbyint), the clamp, then an exact narrowing of the integral values.
        const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(row + k), vinv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
        }
#endif
        for (; k < K; ++k) {
            float v = std::nearbyint(row[k] * inv);
            v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
            out[k] = (int8_t)v;
        }
        std::memset(out + K, 0, (size_t)(K_pad - K));
        xs[m] = amax / 127.0f;
    }
}

static inline int32_t dot_scalar(const uint8_t* w, const int8_t* x, int64_t K_pad) {
    int32_t acc = 0;
    for (int64_t b = 0; b < K_pad / 128; ++b) {
        const uint8_t* wb = w + b * 32;
        const int8_t* xb = x + b * 128;
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 32; ++j) acc += (int32_t)((wb[j] >> (2 * i)) & 3) * xb[32 * i + j];
    }
    return acc;
}

// A register tile: R activation rows (R ≤ 4) against C weight rows (C ≤ 2). Codes are decoded
// once per block and used for every activation row; each activation vector is loaded once and
// used for every weight row. acc[c][r] = Σ_k code_c[k] · x_r[k].
template <int R, int C>
static inline void dot_tile(const uint8_t* const* w, const int8_t* const* xr, int64_t K_pad, int32_t acc[2][8]) {
#if defined(__AVX2__)
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i a32[C][R];
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) a32[c][r] = _mm256_setzero_si256();
    const int64_t nblocks = K_pad / 128;
    for (int64_t b0 = 0; b0 < nblocks; b0 += 8) {  // 8 blocks · 4 maddubs = 32 int16 additions
        const int64_t b1 = b0 + 8 < nblocks ? b0 + 8 : nblocks;
        __m256i a16[C][R];
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) a16[c][r] = _mm256_setzero_si256();
        for (int64_t b = b0; b < b1; ++b) {
            for (int i = 0; i < 4; ++i) {
                __m256i code[C];
                for (int c = 0; c < C; ++c) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(w[c] + b * 32));
                    code[c] = _mm256_and_si256(i ? _mm256_srli_epi16(v, 2 * i) : v, mask);
                }
                for (int r = 0; r < R; ++r) {
                    const __m256i x = _mm256_loadu_si256((const __m256i*)(xr[r] + b * 128 + 32 * i));
                    for (int c = 0; c < C; ++c)
                        a16[c][r] = _mm256_add_epi16(a16[c][r], _mm256_maddubs_epi16(code[c], x));
                }
            }
        }
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) a32[c][r] = _mm256_add_epi32(a32[c][r], _mm256_madd_epi16(a16[c][r], ones));
    }
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) {
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a32[c][r]), _mm256_extracti128_si256(a32[c][r], 1));
            s = _mm_hadd_epi32(s, s);
            s = _mm_hadd_epi32(s, s);
            acc[c][r] = _mm_cvtsi128_si32(s);
        }
#else
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) acc[c][r] = dot_scalar(w[c], xr[r], K_pad);
#endif
}

template <int C>
static inline void dot_rows(int rows, const uint8_t* const* w, const int8_t* const* xr, int64_t K_pad, int32_t acc[2][8]) {
    switch (rows) {
        case 1: dot_tile<1, C>(w, xr, K_pad, acc); break;
        case 2: dot_tile<2, C>(w, xr, K_pad, acc); break;
        case 3: dot_tile<3, C>(w, xr, K_pad, acc); break;
        default: dot_tile<4, C>(w, xr, K_pad, acc); break;
    }
}


#if defined(QK_VNNI)
// Small batches (decoding) stream every weight row from memory once per call, and the hardware
// prefetchers do not run far enough ahead of the short rows read two (ternary) or four (int8 head)
// at a time: both VPDPBUSD loops prefetch PREFETCH_BYTES ahead of each row they read (past the last
// row it is a harmless hint). On a 2-core Zen 5 EPYC, each library build holding its own copy of the
// weights, an FP32 call before every call, medians over shuffled rounds in one process (README,
// "On a Zen 5"): ternary K = N = 2048 0.164 → 0.133 ms at M = 1 (0.056 → 0.050 in a quieter run;
// M ≥ 8 within ±7 %); the int8 head (50,257 × 512, M = 1) 2.05–2.19 → 0.84–0.94 ms in a quiet
// window. 2048 bytes measured alike.
static const int64_t PREFETCH_BYTES = 4096;

// Activations (M, K_pad) → (M, K_pair) with K_pair = K_pad rounded up to 256: for each pair of
// 128-weight blocks (2p, 2p + 1) and each i = 0..3, 32 activations of block 2p (weights 32i..32i+31)
// then the 32 of block 2p + 1, so that 64 bytes of activations meet one 64-byte load of codes
// (two consecutive 32-byte blocks) lane for lane. A missing odd block is zeros.
static void interleave_pairs(const int8_t* xq, int64_t M, int64_t K_pad, int64_t K_pair, int8_t* out) {
    const int64_t nblocks = K_pad / 128;
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* src = xq + m * K_pad;
        int8_t* dst = out + m * K_pair;
        for (int64_t p = 0; p < K_pair / 256; ++p)
            for (int i = 0; i < 4; ++i)
                for (int h = 0; h < 2; ++h) {
                    int8_t* d = dst + p * 256 + 64 * i + 32 * h;
                    const int64_t b = 2 * p + h;
                    if (b < nblocks) std::memcpy(d, src + b * 128 + 32 * i, 32);
                    else std::memset(d, 0, 32);
                }
    }
}

// Lane j of the result is the sum of the 16 lanes of v[j]: 45 shuffles and adds for all sixteen,
// where sixteen separate reductions take ~9 ops each (at K = 2048 a tile's loop is only 8 steps, so
// the reductions were a fifth of the tile's time on a Zen 4). Each step adds pairs of vectors after
// interleaving them, halving the vectors and doubling what each lane holds: 32-bit lanes, then
// 64-bit, then 128-bit quarters, twice. Integer sums: the order does not change the bits.
static inline __m512i lane_sums(const __m512i v[16]) {
    __m512i s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit quarter: [v2i, v2i+1, v2i, v2i+1] partial sums
        s1[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                 _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per quarter: [v4i, v4i+1, v4i+2, v4i+3]
        s2[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s1[2 * i], s1[2 * i + 1]),
                                 _mm512_unpackhi_epi64(s1[2 * i], s1[2 * i + 1]));
    for (int i = 0; i < 2; ++i)  // quarters: [q0 + q1 of s2[2i], q2 + q3 of s2[2i], the same of s2[2i + 1]]
        s3[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// R activation rows (R ≤ 8) against C weight rows (C ≤ 2): acc[c][r] = Σ_k code_c[k] · x_r[k].
// Per pair of blocks: C 64-byte code loads, 4 shift-and-mask steps each, 4·R activation loads and
// 4·R·C VPDPBUSD. The last code load of a row with an odd block count reads 32 bytes (masked), so
// no load crosses the row's end.
// One activation row (batch-1 decoding) goes without the per-step shifts: code i of each byte is
// masked in place (v & (3 << 2i) = 4^i · code_i, at most 192: VPDPBUSD's unsigned operand) into
// its own accumulator set, whose lanes are then exact multiples of 4^i, and the four are combined
// with exact arithmetic shifts at the end. The shifts run on the same port as VPDPBUSD (port 0 for
// 512-bit ops on Ice Lake and Sapphire Rapids), the masks do not, so batch-1 decode issues 8
// instead of 14 port-0 ops per 16 products. Four sets need 4·R·C accumulators: at R = 2 the
// register pressure made it slower (K = N = 2048, M = 2: 0.062 → 0.070 ms), so one row only.
// Lanes stay far inside int32: a lane adds K/16 products of at most 192 · 128.
template <int R, int C>
static inline void dot_tile_vnni(const uint8_t* const* w, const int8_t* const* xr, int64_t K_pad, int32_t acc[2][8]) {
    constexpr int S = R == 1 ? 4 : 1;  // accumulator sets: one per code position, or one shared
    __m512i mask[4];
    for (int i = 0; i < 4; ++i) mask[i] = _mm512_set1_epi8((char)(S == 4 ? 3 << (2 * i) : 3));
    __m512i a[S][C][R];
    for (int i = 0; i < S; ++i)
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) a[i][c][r] = _mm512_setzero_si512();
    const int64_t nblocks = K_pad / 128, npairs = (nblocks + 1) / 2;
    for (int64_t p = 0; p < npairs; ++p) {
        __m512i v[C];
        const bool half = 2 * p + 1 == nblocks;
        for (int c = 0; c < C; ++c)
            v[c] = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, w[c] + p * 64)
                        : _mm512_loadu_si512((const void*)(w[c] + p * 64));
        for (int c = 0; c < C; ++c) _mm_prefetch((const char*)(w[c] + p * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        for (int i = 0; i < 4; ++i) {
            __m512i code[C];
            for (int c = 0; c < C; ++c)
                code[c] = S == 4 ? _mm512_and_si512(v[c], mask[i])
                                 : _mm512_and_si512(i ? _mm512_srli_epi16(v[c], 2 * i) : v[c], mask[0]);
            for (int r = 0; r < R; ++r) {
                const __m512i x = _mm512_loadu_si512((const void*)(xr[r] + p * 256 + 64 * i));
                for (int c = 0; c < C; ++c)
                    a[S == 4 ? i : 0][c][r] = _mm512_dpbusd_epi32(a[S == 4 ? i : 0][c][r], code[c], x);
            }
        }
    }
    if constexpr (S == 1 && R * C >= 8) {
        __m512i v[16];
        for (int j = 0; j < 16; ++j) v[j] = _mm512_setzero_si512();
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) v[8 * c + r] = a[0][c][r];
        _mm512_storeu_si512((void*)&acc[0][0], lane_sums(v));
    } else {
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) {
                __m512i sum = a[0][c][r];
                for (int i = 1; i < S; ++i) sum = _mm512_add_epi32(sum, _mm512_srai_epi32(a[i][c][r], 2 * i));
                acc[c][r] = _mm512_reduce_add_epi32(sum);
            }
    }
}

template <int C>
static inline void dot_rows_vnni(int rows, const uint8_t* const* w, const int8_t* const* xr, int64_t K_pad,
                                 int32_t acc[2][8]) {
    switch (rows) {
        case 1: dot_tile_vnni<1, C>(w, xr, K_pad, acc); break;
        case 2: dot_tile_vnni<2, C>(w, xr, K_pad, acc); break;
        case 3: dot_tile_vnni<3, C>(w, xr, K_pad, acc); break;
        case 4: dot_tile_vnni<4, C>(w, xr, K_pad, acc); break;
        case 5: dot_tile_vnni<5, C>(w, xr, K_pad, acc); break;
        case 6: dot_tile_vnni<6, C>(w, xr, K_pad, acc); break;
        case 7: dot_tile_vnni<7, C>(w, xr, K_pad, acc); break;
        default: dot_tile_vnni<8, C>(w, xr, K_pad, acc); break;
    }
}

#endif

static int32_t* row_sums(const int8_t* xq, int64_t M, int64_t K_pad) {
    int32_t* rowsum = (int32_t*)std::malloc(sizeof(int32_t) * (size_t)(M > 0 ? M : 1));
    for (int64_t m = 0; m < M; ++m) {
        int32_t s = 0;
        const int8_t* x = xq + m * K_pad;
        for (int64_t k = 0; k < K_pad; ++k) s += x[k];
        rowsum[m] = s;
    }
    return rowsum;
}

#if defined(QK_VNNI)
// y[r · N + c] = ((float)(acc[c][r] − rowsum[r]) · xs[r]) · (c ? sc1 : sc0) for a full 8 × 2 tile: the
// scalar epilogue's operations, lane for lane (so the same bits), then 8 bytes stored per row.
static inline void store_tile(const int32_t acc[2][8], const int32_t* rowsum, const float* xs, float sc0, float sc1,
                              float* y, int64_t N) {
    const __m256i rs = _mm256_loadu_si256((const __m256i*)rowsum);
    const __m256d x8 = _mm256_castps_pd(_mm256_loadu_ps(xs));
    const __m512 xs2 = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(x8), x8, 1));
    const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512((const void*)&acc[0][0]),
                                       _mm512_inserti64x4(_mm512_castsi256_si512(rs), rs, 1));
    const __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc0), _mm512_set1_ps(sc1));
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), xs2), sc);
    alignas(64) float t[16];  // (row, column) pairs
    _mm512_store_ps(t, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15), v));
    for (int r = 0; r < 8; ++r) std::memcpy(y + r * N, t + 2 * r, 2 * sizeof(float));
}
#endif

// Output columns in chunks of 64 weight rows (16 KiB at K = 2048, kept in L2), shared out between
// threads; within a chunk, activation tiles of ROW_TILE rows (in L1) meet every weight row of the
// chunk, two at a time.
static const int64_t CHUNK = 64;
#if defined(QK_VNNI)
static const int ROW_TILE = 8;
#else
static const int ROW_TILE = 4;
#endif

// y[m, n] for activation rows [m_begin, m_end) and weight rows [n_begin, n_end) of w, as
// ((Σ_k q_x q_w) · xs[m]) · scale[n · scale_stride] (stride 0: one per-tensor scale): the float operations in the order of
// quillan.export.layers.TernaryLinear's reference path, so every path gives the same bits.
// xq rows are x_stride bytes apart (K_pad, or K_pair in the VNNI layout).
static void gemm_block(const int8_t* xq, int64_t x_stride, const float* xs, const int32_t* rowsum, int64_t m_begin,
                       int64_t m_end, int64_t K_pad, const uint8_t* w, int64_t n_begin, int64_t n_end, int64_t N,
                       const float* scale, int64_t scale_stride, float* y) {
    const int64_t row_bytes = K_pad / 4;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += ROW_TILE) {
        const int rows = (int)(m_end - m0 < ROW_TILE ? m_end - m0 : ROW_TILE);
        const int8_t* xr[8];
        for (int r = 0; r < rows; ++r) xr[r] = xq + (m0 + r) * x_stride;
        for (int64_t n = n_begin; n < n_end; n += 2) {
            const int cols = n + 1 < n_end ? 2 : 1;
            const uint8_t* wr[2] = {w + n * row_bytes, w + (n + cols - 1) * row_bytes};
            int32_t acc[2][8];
#if defined(QK_VNNI)
            if (cols == 2) dot_rows_vnni<2>(rows, wr, xr, K_pad, acc);
            else dot_rows_vnni<1>(rows, wr, xr, K_pad, acc);
            if (rows == 8 && cols == 2) {  // a full tile: the rescale below, 16 lanes at once
                store_tile(acc, rowsum + m0, xs + m0, scale[n * scale_stride], scale[(n + 1) * scale_stride],
                           y + m0 * N + n, N);
                continue;
            }
#else
            if (cols == 2) dot_rows<2>(rows, wr, xr, K_pad, acc);
            else dot_rows<1>(rows, wr, xr, K_pad, acc);
#endif
            for (int c = 0; c < cols; ++c) {
                const float sc = scale[(n + c) * scale_stride];
                for (int r = 0; r < rows; ++r)
                    y[(m0 + r) * N + n + c] = ((float)(acc[c][r] - rowsum[m0 + r]) * xs[m0 + r]) * sc;
            }
        }
    }
}

#if defined(QK_AMX)
// Groups with at least this many activation rows run on AMX tiles (a tile holds 16 rows; below
// that the VPDPBUSD loop wastes less).
static const int64_t AMX_MIN_ROWS = 16;

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Every tile 16 rows × 64 bytes: tmm0-3 int32 accumulators (16 × 16), tmm4-5 u8 codes (16 weight
// rows × 64 codes), tmm6-7 s8 activations (64 values × 16 rows, VNNI layout).
static void amx_configure() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

// Activation rows [m_begin, m_end) of xq (rows K_pad apart) as TDPBUSD's B operand: for each block of
// 16 rows (zeros past m_end) and each 64-value slice kc of K, a 1 KiB tile whose row r holds, for
// m = 0..15, the 4 values x[m, 64·kc + 4r .. 64·kc + 4r + 3].
static void amx_layout_rows(const int8_t* xq, int64_t K_pad, int64_t m_begin, int64_t m_end, int8_t* out) {
    const int64_t nk = K_pad / 64, blocks = (m_end - m_begin + 15) / 16;
    std::memset(out, 0, (size_t)(blocks * nk * 1024));
    for (int64_t m = m_begin; m < m_end; ++m) {
        const int64_t b = (m - m_begin) / 16, mm = (m - m_begin) % 16;
        const int8_t* src = xq + m * K_pad;
        for (int64_t kc = 0; kc < nk; ++kc) {
            int8_t* tile = out + (b * nk + kc) * 1024;
            for (int r = 0; r < 16; ++r) std::memcpy(tile + r * 64 + mm * 4, src + kc * 64 + r * 4, 4);
        }
    }
}

// Weight rows [n_begin, n_end) of w (I2 layout) as TDPBUSD's A operand: for each block of 16 rows
// (code 0 past n_end) and each slice kc, a 1 KiB tile whose row n holds codes 64·kc .. 64·kc + 63.
// Slice kc is half h = kc % 2 of 128-weight block kc / 2: weights 32i + j (i = 2h, 2h + 1) sit in
// bits [2i, 2i + 1] of byte j, so one 32-byte load and two shift-and-masks give the 64 codes.
static void amx_decode_rows(const uint8_t* w, int64_t K_pad, int64_t n_begin, int64_t n_end, uint8_t* out) {
    const int64_t nk = K_pad / 64, row_bytes = K_pad / 4, blocks = (n_end - n_begin + 15) / 16;
    const __m256i mask = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < blocks; ++b)
        for (int r = 0; r < 16; ++r) {
            const int64_t n = n_begin + b * 16 + r;
            for (int64_t kc = 0; kc < nk; ++kc) {
                uint8_t* dst = out + (b * nk + kc) * 1024 + r * 64;
                if (n >= n_end) { std::memset(dst, 0, 64); continue; }
                const __m256i v = _mm256_loadu_si256((const __m256i*)(w + n * row_bytes + (kc / 2) * 32));
                const int sh = 4 * (int)(kc % 2);
                _mm256_storeu_si256((__m256i*)dst, _mm256_and_si256(_mm256_srli_epi16(v, sh), mask));
                _mm256_storeu_si256((__m256i*)(dst + 32), _mm256_and_si256(_mm256_srli_epi16(v, sh + 2), mask));
            }
        }
}

// Two 16-row weight blocks (a0, a1) × two 16-row activation blocks (b0, b1) over nk slices into
// out[4][16][16] (weight row × activation row): tile t = 2·(weight block) + (activation block).
// A missing second block (a1 or b1 null) is skipped.
static void amx_block(const uint8_t* a0, const uint8_t* a1, const int8_t* b0, const int8_t* b1, int64_t nk,
                      int32_t* out) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kc = 0; kc < nk; ++kc) {
        _tile_loadd(4, a0 + kc * 1024, 64);
        _tile_loadd(6, b0 + kc * 1024, 64);
        _tile_dpbusd(0, 4, 6);
        if (b1) { _tile_loadd(7, b1 + kc * 1024, 64); _tile_dpbusd(1, 4, 7); }
        if (a1) {
            _tile_loadd(5, a1 + kc * 1024, 64);
            _tile_dpbusd(2, 5, 6);
            if (b1) _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, out, 64); _tile_stored(1, out + 256, 64);
    _tile_stored(2, out + 512, 64); _tile_stored(3, out + 768, 64);
}

// gemm_block's product on AMX: activation rows [m_begin, m_end) (laid out by amx_layout_rows into xa)
// against weight rows [n_begin, n_end), with gemm_block's epilogue (the same float operations).
static void amx_gemm_block(const int8_t* xa, const float* xs, const int32_t* rowsum, int64_t m_begin, int64_t m_end,
                           int64_t K_pad, const uint8_t* w, int64_t n_begin, int64_t n_end, int64_t N,
                           const float* scale, int64_t scale_stride, float* y, uint8_t* codes) {
    const int64_t nk = K_pad / 64, mblocks = (m_end - m_begin + 15) / 16, nblocks = (n_end - n_begin + 15) / 16;
    amx_decode_rows(w, K_pad, n_begin, n_end, codes);
    alignas(64) int32_t acc[4 * 256];
    // Offsets of column j's 16 entries in a 16×16 int32 tile (rows 64 bytes apart).
    const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    for (int64_t nb = 0; nb < nblocks; nb += 2)
        for (int64_t mb = 0; mb < mblocks; mb += 2) {
            const bool n2 = nb + 1 < nblocks, m2 = mb + 1 < mblocks;
            amx_block(codes + nb * nk * 1024, n2 ? codes + (nb + 1) * nk * 1024 : nullptr, xa + mb * nk * 1024,
                      m2 ? xa + (mb + 1) * nk * 1024 : nullptr, nk, acc);
            // The tiles hold (weight row, activation row); y is (activation row, weight row): write
            // along y's rows, read the 16×16 tile down its columns (in L1).
            for (int t = 0; t < 4; ++t) {
                const int64_t n0 = n_begin + (nb + t / 2) * 16, m0 = m_begin + (mb + t % 2) * 16;
                const int ni = n_end - n0 < 16 ? (int)(n_end - n0) : 16, mj = m_end - m0 < 16 ? (int)(m_end - m0) : 16;
                if (ni <= 0 || mj <= 0) continue;
                const __m512 sc = scale_stride == 0 ? _mm512_set1_ps(scale[0])
                                  : ni == 16 ? _mm512_loadu_ps(scale + n0) : _mm512_setzero_ps();  // no read past the end
                for (int j = 0; j < mj; ++j) {
                    const int32_t rs = rowsum[m0 + j];
                    const float x_s = xs[m0 + j];
                    float* yr = y + (m0 + j) * N + n0;
                    if (ni == 16) {  // the same IEEE operations lane by lane as the scalar line below
                        const __m512i a = _mm512_i32gather_epi32(column, acc + t * 256 + j, 4);
                        const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_set1_epi32(rs)));
                        _mm512_storeu_ps(yr, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(x_s)), sc));
                        continue;
                    }
                    for (int i = 0; i < ni; ++i)
                        yr[i] = ((float)(acc[t * 256 + i * 16 + j] - rs) * x_s) * scale[(n0 + i) * scale_stride];
                }
            }
        }
}
#endif

// Grouped (MoE) product, one call for every expert: rows [offsets[g], offsets[g + 1]) of x (M, K)
// are multiplied by weight matrix g of w (G, N, K_pad / 4) with per-row scales scale (G, N).
// Rows are grouped by expert beforehand (sorted assignments); each (group, column chunk) pair is
// one unit of work, so the cost follows the rows, not the number of experts.
static void grouped_linear(const float* x, int64_t M, int64_t K, int64_t K_pad, float eps, const uint8_t* w, int64_t G,
                           int64_t N, const float* scale, int64_t scale_stride, const int64_t* offsets, float* y) {
    int8_t* xq = (int8_t*)std::aligned_alloc(64, (size_t)((M * K_pad + 63) / 64 * 64));
    float* xs = (float*)std::malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    qk_quantize_rows(x, M, K, K_pad, eps, xq, xs);
    int32_t* rowsum = row_sums(xq, M, K_pad);
#if defined(QK_AMX)
    // Groups of at least AMX_MIN_ROWS rows get the AMX layout (xa_at[g] its first tile; -1: none);
    // the VPDPBUSD layout is built only if some non-empty group is left for it.
    const bool amx = amx_granted();
    int64_t* xa_at = (int64_t*)std::malloc(sizeof(int64_t) * (size_t)G);
    int64_t xa_bytes = 0;
    bool vnni_needed = false;
    for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = offsets[g + 1] - offsets[g];
        xa_at[g] = amx && rows >= AMX_MIN_ROWS ? xa_bytes : -1;
        if (xa_at[g] >= 0) xa_bytes += (rows + 15) / 16 * (K_pad / 64) * 1024;
        else if (rows > 0) vnni_needed = true;
    }
    int8_t* xa = (int8_t*)std::aligned_alloc(64, (size_t)(xa_bytes > 0 ? xa_bytes : 64));
    for (int64_t g = 0; g < G; ++g)
        if (xa_at[g] >= 0) amx_layout_rows(xq, K_pad, offsets[g], offsets[g + 1], xa + xa_at[g]);
#elif defined(QK_VNNI)
    const bool vnni_needed = true;
#endif
#if defined(QK_VNNI)
    const int64_t x_stride = (K_pad + 255) / 256 * 256;
    int8_t* xv = nullptr;
    if (vnni_needed) {
        xv = (int8_t*)std::aligned_alloc(64, (size_t)((M * x_stride + 63) / 64 * 64));
        interleave_pairs(xq, M, K_pad, x_stride, xv);
    }
#else
    const int64_t x_stride = K_pad;
    const int8_t* xv = xq;
#endif
    const int64_t n_chunks = (N + CHUNK - 1) / CHUNK, row_bytes = K_pad / 4;
    int64_t* work = (int64_t*)std::malloc(sizeof(int64_t) * (size_t)(G * n_chunks + 1));
    int64_t n_work = 0;
    for (int64_t g = 0; g < G; ++g)
        if (offsets[g + 1] > offsets[g])
            for (int64_t ch = 0; ch < n_chunks; ++ch) work[n_work++] = g * n_chunks + ch;
#pragma omp parallel if (N * K_pad * M > 262144)
    {
#if defined(QK_AMX)
        // Tile configuration is per thread; the code tiles of one chunk (CHUNK rows × K_pad) are reused
        // by every activation block of the group.
        uint8_t* codes = xa_bytes > 0 ? (uint8_t*)std::aligned_alloc(64, (size_t)(CHUNK * K_pad)) : nullptr;
        if (codes) amx_configure();
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_work; ++i) {
            const int64_t g = work[i] / n_chunks, ch = work[i] % n_chunks;
            const int64_t n_end = (ch + 1) * CHUNK < N ? (ch + 1) * CHUNK : N;
#if defined(QK_AMX)
            if (xa_at[g] >= 0) {
                amx_gemm_block(xa + xa_at[g], xs, rowsum, offsets[g], offsets[g + 1], K_pad, w + g * N * row_bytes,
                               ch * CHUNK, n_end, N, scale + g * N * scale_stride, scale_stride, y, codes);
                continue;
            }
#endif
            gemm_block(xv, x_stride, xs, rowsum, offsets[g], offsets[g + 1], K_pad, w + g * N * row_bytes, ch * CHUNK,
                       n_end, N, scale + g * N * scale_stride, scale_stride, y);
        }
#if defined(QK_AMX)
        if (codes) { _tile_release(); std::free(codes); }
#endif
    }
#if defined(QK_AMX)
    std::free(xa);
    std::free(xa_at);
#endif
#if defined(QK_VNNI)
    std::free(xv);
#endif
    std::free(work);
    std::free(rowsum);
    std::free(xs);
    std::free(xq);
}

extern "C" void qk_grouped_linear(const float* x, int64_t M, int64_t K, int64_t K_pad, float eps, const uint8_t* w,
                                  int64_t G, int64_t N, const float* scale, const int64_t* offsets, float* y) {
    grouped_linear(x, M, K, K_pad, eps, w, G, N, scale, 1, offsets, y);
}

// One weight matrix (N, K_pad / 4) with `n_scales` = 1 (per tensor) or N (per row) scales: the
// single-group case without the offsets and expanded scales the caller would otherwise build per call.
extern "C" void qk_linear(const float* x, int64_t M, int64_t K, int64_t K_pad, float eps, const uint8_t* w, int64_t N,
                          const float* scale, int64_t n_scales, float* y) {
    const int64_t offsets[2] = {0, M};
    grouped_linear(x, M, K, K_pad, eps, w, 1, N, scale, n_scales == 1 ? 0 : 1, offsets, y);
}

// Int8 rows (the int8 output head, `quillan.export.layers.Int8Head`): w int8 (N, K) row-major as
// the module holds it, one float scale per row; y[m, n] = ((float)Σ_k q_x[m, k]·w[n, k] · s_x[m]) ·
// s_w[n], the float operations of Int8Head's `torch._int_mm` path, so both give the same bits.
// VPDPBUSD needs one unsigned operand: w XOR 0x80 is w + 128 read as u8, so the lanes sum
// Σ (w + 128)·q_x and 128·Σ q_x comes off at the end (exact: |Σ| < 2^31 for K < 65,536).
// Batch-1 decoding reads every weight once per token: the loop streams four weight rows at a time
// and keeps them in L1 for every tile of up to four activation rows.
// AVX2 has no VPDPBUSD; `_mm256_maddubs_epi16` (u8 · s8, pairs summed into int16, saturating) takes
// |q_x| as the unsigned operand and w with q_x's sign (`_mm256_sign_epi8`), the product's sign moved
// onto w: one int16 lane is at most 2 · 127 · 127 = 32,258 < 2^15 (both quantizers clip at ±127), so
// it never saturates, and `_mm256_madd_epi16` by ones widens each pair sum to int32 at once (llama.cpp's
// q8_0 dot product on AVX2 does the same). K's tail past the last 32 bytes is summed in scalar code.
#if defined(QK_VNNI)
#define QK_INT8_ROWS 1
// Activation rows are padded to whole 64-byte blocks; the last weight block is masked to K.
static const int64_t INT8_ROWS_ALIGN = 64;
static const int32_t INT8_ROWS_W_OFFSET = 128;  // w XOR 0x80 = w + 128, taken off with 128 · Σ q_x
struct Int8RowsBlocks {
    int64_t nblk;
    __mmask64 tail;
    explicit Int8RowsBlocks(int64_t K) : nblk((K + 63) / 64), tail(K % 64 ? (1ull << (K % 64)) - 1 : ~0ull) {}
};

template <int R, int C>
static inline void int8_rows_tile(const int8_t* w, int64_t K, const int8_t* const* xr, const Int8RowsBlocks& bl,
                                  int32_t acc[4][4]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i a[C][R];
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) a[c][r] = _mm512_setzero_si512();
    for (int64_t b = 0; b < bl.nblk; ++b) {
        const __mmask64 mk = b + 1 == bl.nblk ? bl.tail : ~0ull;
        __m512i wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + c * K + b * 64), flip);
        for (int c = 0; c < C; ++c) _mm_prefetch((const char*)(w + c * K + b * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
            const __m512i x = _mm512_load_si512((const void*)(xr[r] + b * 64));
            for (int c = 0; c < C; ++c) a[c][r] = _mm512_dpbusd_epi32(a[c][r], wv[c], x);
        }
    }
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) acc[c][r] = _mm512_reduce_add_epi32(a[c][r]);
}
#elif defined(__AVX2__)
#define QK_INT8_ROWS 1
static const int64_t INT8_ROWS_ALIGN = 32;
static const int32_t INT8_ROWS_W_OFFSET = 0;  // maddubs takes w signed: nothing to take off
struct Int8RowsBlocks {
    explicit Int8RowsBlocks(int64_t) {}
};

template <int R, int C>
static inline void int8_rows_tile(const int8_t* w, int64_t K, const int8_t* const* xr, const Int8RowsBlocks&,
                                  int32_t acc[4][4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t K32 = K / 32 * 32;
    __m256i a[C][R];
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) a[c][r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
        __m256i wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_si256((const __m256i*)(w + c * K + k));
        for (int r = 0; r < R; ++r) {
            const __m256i x = _mm256_loadu_si256((const __m256i*)(xr[r] + k));
            const __m256i ax = _mm256_sign_epi8(x, x);  // |q_x|, read as u8 by maddubs
            for (int c = 0; c < C; ++c)
                a[c][r] = _mm256_add_epi32(
                    a[c][r], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[c], x)), ones));
        }
    }
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) {
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[c][r]), _mm256_extracti128_si256(a[c][r], 1));
            s = _mm_hadd_epi32(s, s);
            s = _mm_hadd_epi32(s, s);
            int32_t t = _mm_cvtsi128_si32(s);
            for (int64_t k = K32; k < K; ++k) t += (int32_t)w[c * K + k] * (int32_t)xr[r][k];
            acc[c][r] = t;
        }
}
#endif

#if defined(QK_INT8_ROWS)
template <int C>
static inline void int8_rows_cols(int rows, const int8_t* w, int64_t K, const int8_t* const* xr,
                                  const Int8RowsBlocks& bl, int32_t acc[4][4]) {
    switch (rows) {
        case 1: int8_rows_tile<1, C>(w, K, xr, bl, acc); break;
        case 2: int8_rows_tile<2, C>(w, K, xr, bl, acc); break;
        case 3: int8_rows_tile<3, C>(w, K, xr, bl, acc); break;
        default: int8_rows_tile<4, C>(w, K, xr, bl, acc); break;
    }
}
#endif

// 1 where this build has an int8-rows loop: VPDPBUSD (the avx512_vnni and amx_int8 paths) or
// maddubs (the avx2 path); 0 on the scalar build.
extern "C" int qk_has_int8_rows() {
#if defined(QK_INT8_ROWS)
    return 1;
#else
    return 0;
#endif
}

// Returns 0 without writing y where this build has no int8-rows loop (the caller keeps its own path).
extern "C" int qk_int8_rows(const float* x, int64_t M, int64_t K, float eps, const int8_t* w, int64_t N,
                            const float* scale, float* y) {
#if !defined(QK_INT8_ROWS)
    (void)x, (void)M, (void)K, (void)eps, (void)w, (void)N, (void)scale, (void)y;
    return 0;
#else
    const int64_t K_pad = (K + INT8_ROWS_ALIGN - 1) / INT8_ROWS_ALIGN * INT8_ROWS_ALIGN;
    const Int8RowsBlocks bl(K);
    const int64_t xq_bytes = (M * K_pad + 63) / 64 * 64;  // aligned_alloc takes a multiple of the alignment
    int8_t* xq = (int8_t*)std::aligned_alloc(64, (size_t)(xq_bytes > 0 ? xq_bytes : 64));
    float* xs = (float*)std::malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    qk_quantize_rows(x, M, K, K_pad, eps, xq, xs);
    int32_t* rowsum = INT8_ROWS_W_OFFSET ? row_sums(xq, M, K_pad) : nullptr;
    const int64_t n_quads = (N + 3) / 4;
#pragma omp parallel for schedule(static) if (N * K * M > 262144)
    for (int64_t qd = 0; qd < n_quads; ++qd) {
        const int64_t n0 = 4 * qd;
        const int cols = (int)(N - n0 < 4 ? N - n0 : 4);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int rows = (int)(M - m0 < 4 ? M - m0 : 4);
            const int8_t* xr[4];
            for (int r = 0; r < rows; ++r) xr[r] = xq + (m0 + r) * K_pad;
            int32_t acc[4][4];
            if (cols == 4) int8_rows_cols<4>(rows, w + n0 * K, K, xr, bl, acc);
            else
                for (int c = 0; c < cols; ++c) {
                    int32_t one[4][4];
                    int8_rows_cols<1>(rows, w + (n0 + c) * K, K, xr, bl, one);
                    for (int r = 0; r < rows; ++r) acc[c][r] = one[0][r];
                }
            for (int c = 0; c < cols; ++c)
                for (int r = 0; r < rows; ++r) {
                    const int32_t off = rowsum ? INT8_ROWS_W_OFFSET * rowsum[m0 + r] : 0;
                    y[(m0 + r) * N + n0 + c] = ((float)(acc[c][r] - off) * xs[m0 + r]) * scale[n0 + c];
                }
        }
    }
    std::free(rowsum);
    std::free(xs);
    std::free(xq);
    return 1;
#endif
}

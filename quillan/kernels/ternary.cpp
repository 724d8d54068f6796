// W1.58A8 kernels for packed ternary weights (BitNet b1.58 inference), C ABI for ctypes.
//
// Weight layout ("I2" as in bitnet.cpp's I2_S kernel, Wang et al. 2024, "1-bit AI Infra", §2):
// each output row holds K_pad = ceil(K / 128) * 128 codes c = q + 1 in {0, 1, 2}, 2 bits each.
// A 128-weight block is 32 bytes; bits [2i, 2i+1] of byte j hold the code of weight 32·i + j of
// the block, so one 32-byte load and four shift-and-mask steps give four vectors of 32 codes.
//
// y[m, n] = s_w[n] · s_x[m] · Σ_k q_x[m, k] · q_w[n, k], computed as
//   Σ_k c[n, k] · q_x[m, k] − Σ_k q_x[m, k]    (q_w = c − 1)
// with _mm256_maddubs_epi16 (unsigned codes × signed activations). |q_x| ≤ 127, so one maddubs
// lane is at most 2·2·127 = 508 in magnitude and 32 of them fit in int16 before widening.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <omp.h>


extern "C" int qk_version() { return 1; }

extern "C" int qk_has_avx2() {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

// Per-token absmax quantization to int8 (BitNet §2), bit-identical to quillan.bitnet.activation_quantize:
// s = max(absmax, eps); q = clamp(round_half_even(x * ((1 / s) * 127)), -128, 127); scale = s / 127.
// xq is (M, K_pad) with the tail zeroed.
extern "C" void qk_quantize_rows(const float* x, int64_t M, int64_t K, int64_t K_pad, float eps, int8_t* xq, float* xs) {
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(row[k]));
        amax = std::fmax(amax, eps);
        // PyTorch evaluates `127.0 / t` as reciprocal(t) * 127: two roundings, copied here for equal bits.
        const float inv = (1.0f / amax) * 127.0f;
        int8_t* out = xq + m * K_pad;
        for (int64_t k = 0; k < K; ++k) {
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
static inline void dot_tile(const uint8_t* const* w, const int8_t* const* xr, int64_t K_pad, int32_t acc[2][4]) {
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
static inline void dot_rows(int rows, const uint8_t* const* w, const int8_t* const* xr, int64_t K_pad, int32_t acc[2][4]) {
    switch (rows) {
        case 1: dot_tile<1, C>(w, xr, K_pad, acc); break;
        case 2: dot_tile<2, C>(w, xr, K_pad, acc); break;
        case 3: dot_tile<3, C>(w, xr, K_pad, acc); break;
        default: dot_tile<4, C>(w, xr, K_pad, acc); break;
    }
}

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

// Output columns in chunks of 64 weight rows (16 KiB at K = 2048, kept in L2), shared out between
// threads; within a chunk, activation tiles of 4 rows (8 KiB, in L1) meet every weight row of the
// chunk, two at a time.
static const int64_t CHUNK = 64;

// y[m, n] for activation rows [m_begin, m_end) and weight rows [n_begin, n_end) of w, as
// ((Σ_k q_x q_w) · xs[m]) · scale[n or 0]: the float operations in the order of
// quillan.export.layers.TernaryLinear's reference path, so every path gives the same bits.
// `per_channel` 0 reads scale[0] for every row (kept for a per-tensor caller).
static void gemm_block(const int8_t* xq, const float* xs, const int32_t* rowsum, int64_t m_begin, int64_t m_end,
                       int64_t K_pad, const uint8_t* w, int64_t n_begin, int64_t n_end, int64_t N,
                       const float* scale, int per_channel, float* y) {
    const int64_t row_bytes = K_pad / 4;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += 4) {
        const int rows = (int)(m_end - m0 < 4 ? m_end - m0 : 4);
        const int8_t* xr[4];
        for (int r = 0; r < rows; ++r) xr[r] = xq + (m0 + r) * K_pad;
        for (int64_t n = n_begin; n < n_end; n += 2) {
            const int cols = n + 1 < n_end ? 2 : 1;
            const uint8_t* wr[2] = {w + n * row_bytes, w + (n + cols - 1) * row_bytes};
            int32_t acc[2][4];
            if (cols == 2) dot_rows<2>(rows, wr, xr, K_pad, acc);
            else dot_rows<1>(rows, wr, xr, K_pad, acc);
            for (int c = 0; c < cols; ++c) {
                const float sc = scale[per_channel ? n + c : 0];
                for (int r = 0; r < rows; ++r)
                    y[(m0 + r) * N + n + c] = ((float)(acc[c][r] - rowsum[m0 + r]) * xs[m0 + r]) * sc;
            }
        }
    }
}

// Grouped (MoE) product, one call for every expert: rows [offsets[g], offsets[g + 1]) of x (M, K)
// are multiplied by weight matrix g of w (G, N, K_pad / 4) with per-row scales scale (G, N).
// Rows are grouped by expert beforehand (sorted assignments); each (group, column chunk) pair is
// one unit of work, so the cost follows the rows, not the number of experts.
extern "C" void qk_grouped_linear(const float* x, int64_t M, int64_t K, int64_t K_pad, float eps, const uint8_t* w,
                       int64_t G, int64_t N, const float* scale, const int64_t* offsets, float* y) {
    int8_t* xq = (int8_t*)std::aligned_alloc(64, (size_t)((M * K_pad + 63) / 64 * 64));
    float* xs = (float*)std::malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    qk_quantize_rows(x, M, K, K_pad, eps, xq, xs);
    int32_t* rowsum = row_sums(xq, M, K_pad);
    const int64_t n_chunks = (N + CHUNK - 1) / CHUNK, row_bytes = K_pad / 4;
    int64_t* work = (int64_t*)std::malloc(sizeof(int64_t) * (size_t)(G * n_chunks + 1));
    int64_t n_work = 0;
    for (int64_t g = 0; g < G; ++g)
        if (offsets[g + 1] > offsets[g])
            for (int64_t ch = 0; ch < n_chunks; ++ch) work[n_work++] = g * n_chunks + ch;
#pragma omp parallel for schedule(dynamic, 1) if (N * K_pad * M > 262144)
    for (int64_t i = 0; i < n_work; ++i) {
        const int64_t g = work[i] / n_chunks, ch = work[i] % n_chunks;
        const int64_t n_end = (ch + 1) * CHUNK < N ? (ch + 1) * CHUNK : N;
        gemm_block(xq, xs, rowsum, offsets[g], offsets[g + 1], K_pad, w + g * N * row_bytes, ch * CHUNK, n_end, N,
                   scale + g * N, 1, y);
    }
    std::free(work);
    std::free(rowsum);
    std::free(xs);
    std::free(xq);
}

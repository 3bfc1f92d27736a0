// Fused CPU kernels of the compact runner's small decode steps (llm_server/engine/cpu_kernels.py).
//
// One call each for what the eager forward does in many small PyTorch ops per layer: the residual
// add with the RMSNorm after it, rotary on q and k with the cache write, attention of a few new
// queries over the slot cache, and SiLU(gate) * up; where the CPU has AVX-512 VNNI, also the int4 and
// int8 weight-only linears (quant.Int4Linear, quant.Int8Linear). Plain C++ with no PyTorch headers (it compiles
// in about a second); Python hands in data pointers (ctypes). Attention over much context and the
// row-wise kernels over many rows run on torch's OpenMP threads (the library links libgomp.so.1,
// which resolves to the copy torch loaded); a decode step of a few rows stays on one thread.
//
// Element type T is float (float32) or uint16_t holding bfloat16 bits; arithmetic is float32 and
// each output is rounded once (round to nearest even). Layouts (all contiguous):
//   x, delta, out        [rows, dim]
//   qkv                  [rows, (heads + 2 * kv_heads) * head_dim], rows = n * steps
//   cos, sin             [table, head_dim]; sin sign-folded (-sin on the first half)
//   keys of one layer    [slots, kv_heads, head_dim, capacity] (transposed)
//   values of one layer  [slots, kv_heads, capacity, head_dim]
//   positions            [n, steps] int64; row i of the batch is cache slot lo + i

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LLM_VNNI 1
#endif
#include <vector>

namespace {

constexpr long PARALLEL_ROWS = 32;  // rows from which the row-wise kernels use the OpenMP threads

inline float load(const float* p, long i) { return p[i]; }

inline float load(const uint16_t* p, long i) {
    uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline void store(float* p, long i, float value) { p[i] = value; }

inline void store(uint16_t* p, long i, float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
        p[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    p[i] = static_cast<uint16_t>(bits >> 16);
}

// exp(x), written so the compiler vectorizes it (std::exp stays a scalar call): 2^(x log2 e) =
// 2^k * 2^f with k the nearest integer and |f| <= 1/2, 2^f by its Taylor series to degree 7
// (relative error below 1e-7); the exponent is clamped to +-126 (softmax and SiLU never need more).
inline float exp_approx(float x) {
    const float t = std::min(std::max(x * 1.4426950408889634f, -126.0f), 126.0f);
    const float k = std::nearbyint(t);
    const float f = (t - k) * 0.6931471805599453f;  // 2^(t - k) = e^f
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

template <typename T>
void add_rms_norm(T* x, const T* delta, const T* weight, T* out, long rows, long dim, float eps) {
#pragma omp parallel if (rows >= PARALLEL_ROWS)
    {
    std::vector<float> row(dim);
#pragma omp for schedule(static)
    for (long r = 0; r < rows; ++r) {
        T* xr = x + r * dim;
        for (long i = 0; i < dim; ++i) {
            float v = load(xr, i);
            if (delta) {
                store(xr, i, v + load(delta + r * dim, i));  // the residual keeps x's dtype
                v = load(xr, i);
            }
            row[i] = v;
        }
        float partial[16] = {0.0f};
        long i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int j = 0; j < 16; ++j) partial[j] += row[i + j] * row[i + j];
        float sum = 0.0f;
        for (; i < dim; ++i) sum += row[i] * row[i];
        for (int j = 0; j < 16; ++j) sum += partial[j];
        const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
        for (long k = 0; k < dim; ++k) store(out + r * dim, k, row[k] * inv * load(weight, k));
    }
    }
}

template <typename T>
void rope_store(const T* qkv, const T* cos, const T* sin, long table, const int64_t* positions, T* q_out,
                T* keys, T* values, long n, long steps, long heads, long kv_heads, long head_dim, long capacity,
                long lo) {
    const long half = head_dim / 2, width = (heads + 2 * kv_heads) * head_dim;
#pragma omp parallel if (n * steps >= PARALLEL_ROWS)
    {
    std::vector<float> rot(head_dim);
#pragma omp for schedule(static)
    for (long row = 0; row < n * steps; ++row) {
        {
            const long i = row / steps, pos = positions[row];
            const long at = pos < table ? pos : table - 1;
            const T* in = qkv + row * width;
            const T* c = cos + at * head_dim;
            const T* s = sin + at * head_dim;
            for (long h = 0; h < heads + kv_heads; ++h) {  // rotary: x * cos + roll(x, half) * sin
                const T* x = in + h * head_dim;
                for (long d = 0; d < half; ++d) rot[d] = load(x, d) * load(c, d) + load(x, d + half) * load(s, d);
                for (long d = half; d < head_dim; ++d)
                    rot[d] = load(x, d) * load(c, d) + load(x, d - half) * load(s, d);
                if (h < heads) {
                    for (long d = 0; d < head_dim; ++d) store(q_out + (row * heads + h) * head_dim, d, rot[d]);
                } else {  // key d of this position: [slot, kv_head, d, pos]
                    T* k = keys + ((lo + i) * kv_heads + (h - heads)) * head_dim * capacity + pos;
                    for (long d = 0; d < head_dim; ++d) store(k, d * capacity, rot[d]);
                }
            }
            const T* v = in + (heads + kv_heads) * head_dim;
            for (long h = 0; h < kv_heads; ++h)
                std::memcpy(values + (((lo + i) * kv_heads + h) * capacity + pos) * head_dim, v + h * head_dim,
                            head_dim * sizeof(T));
        }
    }
    }
}

// out = inverse * sum over j of weights[j] * values[j], for a head dim of 16 * B, the sum held in
// registers (written as a plain loop, the compiler left the sum in memory and the loop scalar).
template <typename T, int B>
void weigh_values(const float* weights, const T* values, long count, float inverse, T* out) {
    float acc[B][16] = {};
    for (long j = 0; j < count; ++j) {
        const float p = weights[j];
        const T* v = values + j * 16 * B;
        for (int b = 0; b < B; ++b)
            for (int l = 0; l < 16; ++l) acc[b][l] += p * load(v, b * 16 + l);
    }
    for (int b = 0; b < B; ++b)
        for (int l = 0; l < 16; ++l) store(out, b * 16 + l, acc[b][l] * inverse);
}

// Attention of query (i, t) of head h over its slot's keys 0 .. positions[i, t].
template <typename T>
void attend_one(const T* q, const T* keys, const T* values, long row, long slot, long seen, long h, T* out,
                long heads, long kv_heads, long head_dim, long capacity, float scale, float* scores, float* acc) {
    const long kv = slot * kv_heads + h / (heads / kv_heads);
    const T* kt = keys + kv * head_dim * capacity;
    const T* vs = values + kv * capacity * head_dim;
    const T* qh = q + (row * heads + h) * head_dim;
    std::fill(scores, scores + seen, 0.0f);
    long d = 0;
    for (; d + 4 <= head_dim; d += 4) {  // four rows of keys a pass: a quarter of the passes over scores
        const float q0 = load(qh, d) * scale, q1 = load(qh, d + 1) * scale;
        const float q2 = load(qh, d + 2) * scale, q3 = load(qh, d + 3) * scale;
        const T *k0 = kt + d * capacity, *k1 = k0 + capacity, *k2 = k1 + capacity, *k3 = k2 + capacity;
        for (long j = 0; j < seen; ++j)
            scores[j] += q0 * load(k0, j) + q1 * load(k1, j) + q2 * load(k2, j) + q3 * load(k3, j);
    }
    for (; d < head_dim; ++d) {
        const float qd = load(qh, d) * scale;
        const T* kd = kt + d * capacity;
        for (long j = 0; j < seen; ++j) scores[j] += qd * load(kd, j);
    }
    float top = scores[0];
    for (long j = 1; j < seen; ++j) top = scores[j] > top ? scores[j] : top;
    for (long j = 0; j < seen; ++j) scores[j] = exp_approx(scores[j] - top);
    float total = 0.0f;
    for (long j = 0; j < seen; ++j) total += scores[j];
    const float inverse = 1.0f / total;
    T* o = out + (row * heads + h) * head_dim;
    if (head_dim == 64) return weigh_values<T, 4>(scores, vs, seen, inverse, o);
    if (head_dim == 128) return weigh_values<T, 8>(scores, vs, seen, inverse, o);
    std::fill(acc, acc + head_dim, 0.0f);
    for (long j = 0; j < seen; ++j) {
        const float p = scores[j] * inverse;
        const T* vj = vs + j * head_dim;
        for (long d = 0; d < head_dim; ++d) acc[d] += p * load(vj, d);
    }
    for (long d = 0; d < head_dim; ++d) store(o, d, acc[d]);
}

// Every (query, head) pair, split over ``threads`` OpenMP threads (torch's own runtime: the library
// links libgomp.so.1, which the process already loaded with torch) when the work pays for it.
template <typename T>
void attend(const T* q, const T* keys, const T* values, const int64_t* positions, T* out, long n, long steps,
            long heads, long kv_heads, long head_dim, long capacity, long lo, float scale, long threads) {
    const long pairs = n * steps * heads;
    long work = 0;  // keys read, summed over the pairs
    for (long row = 0; row < n * steps; ++row) work += (positions[row] + 1) * heads;
    if (work < 4096) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores(capacity), acc(head_dim);
#pragma omp for schedule(static)
        for (long pair = 0; pair < pairs; ++pair) {
            const long row = pair / heads;
            attend_one(q, keys, values, row, lo + row / steps, positions[row] + 1, pair % heads, out, heads,
                       kv_heads, head_dim, capacity, scale, scores.data(), acc.data());
        }
    }
}

#ifdef LLM_VNNI
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// Software prefetch of the weight stream, this many bytes ahead of the load. A decode step reads
// each weight once from memory, and on an Intel Xeon (KVM, 2 vCPUs, 2026-12-08) the hardware
// prefetchers alone kept the int4 body at ~21 GB/s: with these the embedded model's step went from
// 5.4 to 3.2 ms (benchmarks/results/prefetch_ab_20261208.txt). On an AMD EPYC they changed nothing.
// A prefetch never faults, so reading past a tensor's end is harmless.
constexpr long INT4_PREFETCH_AHEAD = 8192;
constexpr long INT8_PREFETCH_AHEAD = 4096;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline __m512 load16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// x [rows, in] to two int8 levels per group of 32 inputs: x ~= s * xq + (s / 254) * xr, with s = max |x|
// / 127 (llama.cpp's Q8_1 for xq) and xr the rounding error of xq, itself rounded (|x - s * xq| <= s /
// 2). Two dot products per weight byte instead of one: about 15 bits of x instead of 8, which keeps
// the linear as accurate as PyTorch's weight-only kernels (one int8 level alone lowered the embedded
// model's teacher-forced top-1 agreement with bf16 from 0.976 to 0.959). Per group: s and the sum of
// the x the dot products see, s * sum(xq) + (s / 254) * sum(xr).
constexpr float RESIDUAL = 254.0f;

template <typename T>
void quantize_groups(const T* x, long count, int8_t* xq, int8_t* xr, float* scale, float* scaled_sum) {
    for (long g = 0; g < count; ++g) {
        const __m512 a = load16(x + g * 32), b = load16(x + g * 32 + 16);
        const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float s = top > 0.0f ? top / 127.0f : 1.0f;
        const __m512 inverse = _mm512_set1_ps(1.0f / s), step = _mm512_set1_ps(s);
        const __m512 fine = _mm512_set1_ps(RESIDUAL / s);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inverse));  // round to nearest even
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse));
        const __m512i ra = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), step, a), fine));
        const __m512i rb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), step, b), fine));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * 32), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xr + g * 32), _mm512_cvtsepi32_epi8(ra));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xr + g * 32 + 16), _mm512_cvtsepi32_epi8(rb));
        scale[g] = s;
        const float coarse = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
        const float residual = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(ra, rb)));
        scaled_sum[g] = s * coarse + (s / RESIDUAL) * residual;
    }
}

// Both linears below take x [rows, in] (in a multiple of 64), quantize it with quantize_groups and
// give y [rows, out]. Each 64 inputs take one VNNI instruction, dpbusd(unsigned weight bytes, xq),
// which sums 4 products per lane: lanes 0-7 over the first group of 32, 8-15 over the second. Output
// rows split over the threads; a weight row is read from memory once and from L1 for the next x row.

// Weight int8 [out, in], one scale per output row: W = w * scale. dpbusd takes w + 128 (unsigned);
// the 128 * sum(x) this adds is taken back once per x row.
template <typename T>
void int8_linear(const T* x, const int8_t* w, const T* scales, T* y, long rows, long out, long in, long threads) {
    const long pairs = in / 64, groups = in / 32;
    std::vector<int8_t> xq(rows * in), xr(rows * in);
    std::vector<float> scale(rows * groups), scaled_sum(rows * groups), offset(rows, 0.0f);
    quantize_groups(x, rows * groups, xq.data(), xr.data(), scale.data(), scaled_sum.data());
    for (long m = 0; m < rows; ++m)
        for (long g = 0; g < groups; ++g) offset[m] += 128.0f * scaled_sum[m * groups + g];
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const __mmask16 first = 0x00ff;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long n = 0; n < out; ++n) {
        const int8_t* wn = w + n * in;
        for (long m = 0; m < rows; ++m) {
            const int8_t *xm = xq.data() + m * in, *rm = xr.data() + m * in;
            const float* sm = scale.data() + m * groups;
            __m512 acc = _mm512_setzero_ps();
            for (long p = 0; p < pairs; ++p) {
                prefetch(wn + p * 64 + INT8_PREFETCH_AHEAD);
                const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wn + p * 64), flip);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xm + p * 64));
                const __m512i fine = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(rm + p * 64));
                const __m512 lanes = _mm512_mask_blend_ps(first, _mm512_set1_ps(sm[2 * p + 1]), _mm512_set1_ps(sm[2 * p]));
                const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fine), _mm512_set1_ps(1.0f / RESIDUAL),
                                                   _mm512_cvtepi32_ps(dot));
                acc = _mm512_fmadd_ps(sum, lanes, acc);
            }
            store(y + m * out, n, (_mm512_reduce_add_ps(acc) - offset[m]) * load(scales, n));
        }
    }
}

// Weight int4, asymmetric per group of 32 inputs: W = (q - 8) * scale + zero, q in [0, 15] (quant.Int4Linear's
// levels, the same weights as PyTorch's int4 kernel), in blocks of 16 output rows, one row per lane:
// each VNNI instruction takes 4 inputs of the 16 rows against those 4 bytes of xq broadcast. nibbles,
// per block of 16 rows and group, 4 x 64 bytes: byte 4r + j of vector i holds row r's q[8i + j] (low
// nibble) and q[8i + 4 + j] (high). scale_zero, per block and group: the 16 rows' scales, then their
// zeros (the middle level's value: stored rather than the lowest level's, whose rounding to bf16
// would shift every weight of the group). Per group and row: scale * dot(q, x) + low * sum(x), low =
// zero - 8 * scale. Up to 4 rows of x share each unpacked weight vector.
inline __m512i broadcast4(const int8_t* p) {
    int32_t bytes;
    std::memcpy(&bytes, p, 4);
    return _mm512_set1_epi32(bytes);
}

template <typename T, int R>
void int4_block(const uint8_t* w, const T* scale_zero, const int8_t* xq, const int8_t* xr, const float* xscale,
                const float* xsum, long groups, long in, T* y, long out) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (long g = 0; g < groups; ++g) {
        __m512i coarse[R], fine[R];
        for (int r = 0; r < R; ++r) coarse[r] = fine[r] = _mm512_setzero_si512();
        for (long i = 0; i < 4; ++i) prefetch(w + g * 256 + INT4_PREFETCH_AHEAD + i * 64);
        for (long i = 0; i < 4; ++i) {
            const __m512i v = _mm512_loadu_si512(w + (g * 4 + i) * 64);
            const __m512i lo = _mm512_and_si512(v, nibble);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            for (int r = 0; r < R; ++r) {
                const long at = r * in + g * 32 + i * 8;
                coarse[r] = _mm512_dpbusd_epi32(coarse[r], lo, broadcast4(xq + at));
                coarse[r] = _mm512_dpbusd_epi32(coarse[r], hi, broadcast4(xq + at + 4));
                fine[r] = _mm512_dpbusd_epi32(fine[r], lo, broadcast4(xr + at));
                fine[r] = _mm512_dpbusd_epi32(fine[r], hi, broadcast4(xr + at + 4));
            }
        }
        const __m512 scale = load16(scale_zero + g * 32);
        const __m512 low = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, load16(scale_zero + g * 32 + 16));
        const __m512 residual = _mm512_set1_ps(1.0f / RESIDUAL);
        for (int r = 0; r < R; ++r) {
            const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fine[r]), residual, _mm512_cvtepi32_ps(coarse[r]));
            acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(xscale[r * groups + g])), acc[r]);
            acc[r] = _mm512_fmadd_ps(low, _mm512_set1_ps(xsum[r * groups + g]), acc[r]);
        }
    }
    alignas(64) float lanes[16];
    for (int r = 0; r < R; ++r) {
        _mm512_store_ps(lanes, acc[r]);
        for (long l = 0; l < 16; ++l) store(y + r * out, l, lanes[l]);
    }
}

template <typename T>
void int4_linear(const T* x, const uint8_t* nibbles, const T* scale_zero, T* y, long rows, long out, long in,
                 long threads) {
    const long groups = in / 32;
    std::vector<int8_t> xq(rows * in), xr(rows * in);
    std::vector<float> scale(rows * groups), scaled_sum(rows * groups);
    quantize_groups(x, rows * groups, xq.data(), xr.data(), scale.data(), scaled_sum.data());
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long block = 0; block < out / 16; ++block) {
        const uint8_t* w = nibbles + block * groups * 256;
        const T* sl = scale_zero + block * groups * 32;
        for (long m = 0; m < rows; m += 4) {
            const int8_t *xm = xq.data() + m * in, *rm = xr.data() + m * in;
            const float *xs = scale.data() + m * groups, *sums = scaled_sum.data() + m * groups;
            T* ym = y + m * out + block * 16;
            switch (std::min(4L, rows - m)) {
                case 1: int4_block<T, 1>(w, sl, xm, rm, xs, sums, groups, in, ym, out); break;
                case 2: int4_block<T, 2>(w, sl, xm, rm, xs, sums, groups, in, ym, out); break;
                case 3: int4_block<T, 3>(w, sl, xm, rm, xs, sums, groups, in, ym, out); break;
                default: int4_block<T, 4>(w, sl, xm, rm, xs, sums, groups, in, ym, out); break;
            }
        }
    }
}

template <typename T>
void silu_mul(const T* gate_up, T* out, long rows, long inter);  // below

// Every decoder layer of a small step whose linears are all VNNI int4 (no bias), in one call: what
// LlamaRunner._run_fused does layer by layer, the same kernels in the same order (so the same
// result), without going back to Python between them. x [rows, hidden] is the residual stream and
// h its first layer's normed input on entry; on return h is the final norm's output. ``table`` holds,
// per layer, 10 pointers: qkv, o, gate_up and down as (nibbles, scale_zero), then ln2 and the next
// norm (the next layer's ln1, the model's final norm after the last layer). keys / values: the slot
// cache of layer 0; layer i's is ``layer_stride`` elements further. dims: hidden, qkv_out, inter,
// heads, kv_heads, head_dim, capacity, rope table length.
template <typename T>
void int4_body(T* x, T* h, void* const* table, long layers, T* keys, T* values, long layer_stride,
               const T* cos, const T* sin, const int64_t* positions, const long* dims, long n, long steps,
               long lo, float eps, float scale, long threads) {
    const long hidden = dims[0], qkv_out = dims[1], inter = dims[2], heads = dims[3], kv_heads = dims[4];
    const long head_dim = dims[5], capacity = dims[6], rope_table = dims[7], rows = n * steps;
    std::vector<T> qkv(rows * qkv_out), q(rows * heads * head_dim), attn(rows * heads * head_dim);
    std::vector<T> o(rows * hidden), gate_up(rows * 2 * inter), act(rows * inter), down(rows * hidden);
    const long attn_width = heads * head_dim;
    for (long i = 0; i < layers; ++i) {
        void* const* w = table + i * 10;
        auto nibbles = [&](int k) { return static_cast<const uint8_t*>(w[k]); };
        auto weights = [&](int k) { return static_cast<const T*>(w[k]); };
        T* layer_keys = keys + i * layer_stride;
        T* layer_values = values + i * layer_stride;
        int4_linear<T>(h, nibbles(0), weights(1), qkv.data(), rows, qkv_out, hidden, threads);
        rope_store<T>(qkv.data(), cos, sin, rope_table, positions, q.data(), layer_keys, layer_values, n, steps,
                      heads, kv_heads, head_dim, capacity, lo);
        attend<T>(q.data(), layer_keys, layer_values, positions, attn.data(), n, steps, heads, kv_heads, head_dim,
                  capacity, lo, scale, threads);
        int4_linear<T>(attn.data(), nibbles(2), weights(3), o.data(), rows, hidden, attn_width, threads);
        add_rms_norm<T>(x, o.data(), weights(8), h, rows, hidden, eps);
        int4_linear<T>(h, nibbles(4), weights(5), gate_up.data(), rows, 2 * inter, hidden, threads);
        silu_mul<T>(gate_up.data(), act.data(), rows, inter);
        int4_linear<T>(act.data(), nibbles(6), weights(7), down.data(), rows, hidden, inter, threads);
        add_rms_norm<T>(x, down.data(), weights(9), h, rows, hidden, eps);
    }
}
#endif

extern "C" int vnni_available() {
#ifdef LLM_VNNI
    return 1;
#else
    return 0;
#endif
}

template <typename T>
void silu_mul(const T* gate_up, T* out, long rows, long inter) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; ++r) {
        const T* g = gate_up + r * 2 * inter;
        for (long k = 0; k < inter; ++k) {
            const float a = load(g, k);
            store(out + r * inter, k, a / (1.0f + exp_approx(-a)) * load(g, inter + k));
        }
    }
}

}  // namespace

#ifdef LLM_VNNI
#define LLM_VNNI_ENTRIES(SUFFIX, T)                                                                            \
    extern "C" void int8_linear_##SUFFIX(const void* x, const int8_t* w, const void* scales, void* y,         \
                                         long rows, long out, long in, long threads) {                        \
        int8_linear<T>(static_cast<const T*>(x), w, static_cast<const T*>(scales), static_cast<T*>(y), rows,  \
                       out, in, threads);                                                                     \
    }                                                                                                         \
    extern "C" void int4_linear_##SUFFIX(const void* x, const uint8_t* w, const void* scale_zero, void* y,    \
                                         long rows, long out, long in, long threads) {                        \
        int4_linear<T>(static_cast<const T*>(x), w, static_cast<const T*>(scale_zero), static_cast<T*>(y),    \
                       rows, out, in, threads);                                                               \
    }                                                                                             \
    extern "C" void int4_body_##SUFFIX(void* x, void* h, void* const* table, long layers, void* keys,         \
                                       void* values, long layer_stride, const void* cos, const void* sin,      \
                                       const int64_t* positions, const long* dims, long n, long steps, long lo, \
                                       float eps, float scale, long threads) {                                \
        int4_body<T>(static_cast<T*>(x), static_cast<T*>(h), table, layers, static_cast<T*>(keys),            \
                     static_cast<T*>(values), layer_stride, static_cast<const T*>(cos),                        \
                     static_cast<const T*>(sin), positions, dims, n, steps, lo, eps, scale, threads);         \
    }
#else
#define LLM_VNNI_ENTRIES(SUFFIX, T)
#endif

// The C entry points: suffix f32 (float) or bf16 (bfloat16 bits); pointers as void*.
#define LLM_KERNELS(SUFFIX, T)                                                                               \
    extern "C" void add_rms_norm_##SUFFIX(void* x, const void* delta, const void* weight, void* out, long rows, \
                                          long dim, float eps) {                                              \
        add_rms_norm<T>(static_cast<T*>(x), static_cast<const T*>(delta), static_cast<const T*>(weight),     \
                        static_cast<T*>(out), rows, dim, eps);                                                \
    }                                                                                                         \
    extern "C" void rope_store_##SUFFIX(const void* qkv, const void* cos, const void* sin, long table,        \
                                        const int64_t* positions, void* q_out, void* keys, void* values,      \
                                        long n, long steps, long heads, long kv_heads, long head_dim,         \
                                        long capacity, long lo) {                                             \
        rope_store<T>(static_cast<const T*>(qkv), static_cast<const T*>(cos), static_cast<const T*>(sin),     \
                      table, positions, static_cast<T*>(q_out), static_cast<T*>(keys), static_cast<T*>(values), \
                      n, steps, heads, kv_heads, head_dim, capacity, lo);                                     \
    }                                                                                                         \
    extern "C" void attend_##SUFFIX(const void* q, const void* keys, const void* values,                     \
                                    const int64_t* positions, void* out, long n, long steps, long heads,      \
                                    long kv_heads, long head_dim, long capacity, long lo, float scale,        \
                                    long threads) {                                                           \
        attend<T>(static_cast<const T*>(q), static_cast<const T*>(keys), static_cast<const T*>(values),       \
                  positions, static_cast<T*>(out), n, steps, heads, kv_heads, head_dim, capacity, lo, scale,  \
                  threads);                                                                                   \
    }                                                                                                         \
    extern "C" void silu_mul_##SUFFIX(const void* gate_up, void* out, long rows, long inter) {               \
        silu_mul<T>(static_cast<const T*>(gate_up), static_cast<T*>(out), rows, inter);                     \
    }                                                                                                         \
    LLM_VNNI_ENTRIES(SUFFIX, T)

LLM_KERNELS(f32, float)
LLM_KERNELS(bf16, uint16_t)

// Fused CPU kernels of the compact runner's small decode steps (llm_server/engine/cpu_kernels.py).
//
// One call each for what the eager forward does in many small PyTorch ops per layer: the residual
// add with the RMSNorm after it, rotary on q and k with the cache write, attention of a few new
// queries over the slot cache, and SiLU(gate) * up. Plain C++ with no PyTorch headers (it compiles
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

// Attention of query (i, t) of head h over its slot's keys 0 .. positions[i, t].
template <typename T>
void attend_one(const T* q, const T* keys, const T* values, long row, long slot, long seen, long h, T* out,
                long heads, long kv_heads, long head_dim, long capacity, float scale, float* scores, float* acc) {
    const long kv = slot * kv_heads + h / (heads / kv_heads);
    const T* kt = keys + kv * head_dim * capacity;
    const T* vs = values + kv * capacity * head_dim;
    const T* qh = q + (row * heads + h) * head_dim;
    std::fill(scores, scores + seen, 0.0f);
    for (long d = 0; d < head_dim; ++d) {
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
    std::fill(acc, acc + head_dim, 0.0f);
    for (long j = 0; j < seen; ++j) {
        const float p = scores[j] * inverse;
        const T* vj = vs + j * head_dim;
        for (long d = 0; d < head_dim; ++d) acc[d] += p * load(vj, d);
    }
    for (long d = 0; d < head_dim; ++d) store(out + (row * heads + h) * head_dim, d, acc[d]);
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
    }

LLM_KERNELS(f32, float)
LLM_KERNELS(bf16, uint16_t)

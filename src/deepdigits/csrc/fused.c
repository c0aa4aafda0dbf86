// Fused CPU kernels for deepdigits.fused: (1) a one-input-channel 3x3 convolution, 2x2 max pooling (stride 2)
// and ReLU as one pass, forward and weight gradient; (2) ReLU and dropout, forward and back, and likewise 2x2 max
// pooling, ReLU, flatten and dropout; (3) Adam on float32 weights from bfloat16 gradients, writing the weights'
// bfloat16 copy. Scalar tails handle any length.
//
// (1): the convolution's output (N x 26 x 26 x C for MNIST) is never stored: each
// pooled value is the largest of its window's four convolution outputs, computed from a 4x4 patch of input.
//
// Arithmetic as torch's bfloat16 autocast does it (bf16 != 0): the weights and bias arrive already rounded to
// bfloat16, products are summed in float32, and each convolution output is rounded to bfloat16 before the
// window's four are compared; the first largest wins, as in torch's max pooling. The weight gradient is summed
// in float32. Vectors are GCC/Clang vector extensions, so one source builds for AVX-512, AVX2 or NEON
// (-march=native): 16 channels a vector where AVX-512 holds them in one register, 8 elsewhere. Threads: OpenMP,
// the runtime torch has loaded (libgomp.so.1 by soname).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

// 16 lanes built for AVX2 (-march=haswell) split every vector in two: the 9 kernel taps alone would need 18 of its
// 16 registers. Tutorial 003 in float32 on AVX2 (EPYC held to AVX2, 2 threads), the convolution-pooling kernel 4.59
// -> 0.47 ms a step forward and 3.97 -> 0.38 ms back with 8 lanes, the whole step 18.6 -> 9.5 ms.
#if defined(__AVX512F__)
#define VBYTES 64
#else
#define VBYTES 32
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
typedef uint32_t vu __attribute__((vector_size(VBYTES)));
typedef uint16_t vh __attribute__((vector_size(VBYTES / 2)));
typedef uint8_t vb __attribute__((vector_size(VBYTES / 4)));
typedef int16_t vs __attribute__((vector_size(VBYTES / 2)));
typedef uint64_t vq __attribute__((vector_size(64)));
#define LANES (VBYTES / 4)
#define DEAD 4  // arg value of a pooled output that ReLU zeroed: no gradient flows through it

int kernel_lanes(void) { return LANES; }  // float lanes a vector, as this build was compiled

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t float_to_bf16(float f) {  // the same rounding as round_bf16, one value
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vi select_i(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }
static inline vf select_f(vi mask, vf a, vf b) { return (vf)select_i(mask, (vi)a, (vi)b); }

// Round to the nearest bfloat16, ties to even (as torch rounds), kept in float32; NaN stays NaN.
static inline vf round_bf16(vf v) {
    vu u = (vu)v;
    vu rounded = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
    vi nan = (vi)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return (vf)select_i(nan, (vi)(u | 0x00400000u), (vi)rounded);
}
static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}
static inline void store_bf16(uint16_t *p, vf v) {  // v already holds bfloat16 values
    vh h = __builtin_convertvector(((vu)v) >> 16, vh);
    memcpy(p, &h, sizeof h);
}

// The 4x4 input patch under pooled output (i, j) of image img, as float32.
static inline void load_patch(int bf16, const void *x, long img, int h, int w, int i, int j, float p[4][4]) {
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < 4; s++) {
            long at = (img * h + 2 * i + r) * w + 2 * j + s;
            p[r][s] = bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
        }
}

// x: (n, h, w), bfloat16 if bf16 else float32; wt: (9, c) float32, the kernel transposed; b: (c) float32;
// c a multiple of 16. Out: y (n, ph, pw, c) in x's dtype, ph = (h - 2) / 2, pw = (w - 2) / 2; arg (n, ph, pw, c):
// which of the window's four convolution outputs won (0-3, row-major), DEAD where ReLU gave 0.
void convpool_forward(int bf16, const void *x, const float *wt, const float *b, void *y, uint8_t *arg,
                      int n, int h, int w, int c, int threads) {
    int ph = (h - 2) / 2, pw = (w - 2) / 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long row = 0; row < (long)n * ph; row++) {
        long img = row / ph;
        int i = (int)(row % ph);
        float p[4][4];
        for (int j = 0; j < pw; j++) {
            load_patch(bf16, x, img, h, w, i, j, p);
            long at = ((img * ph + i) * pw + j) * c;
            for (int k0 = 0; k0 < c; k0 += LANES) {
                vf wv[9];
                for (int t = 0; t < 9; t++) wv[t] = load_f(wt + t * c + k0);
                vf bias = load_f(b + k0), best = bias;
                vi won = (vi){0};
                for (int o = 0; o < 4; o++) {
                    int dy = o >> 1, dx = o & 1;
                    vf sum = bias;
                    for (int ky = 0; ky < 3; ky++)
                        for (int kx = 0; kx < 3; kx++) sum += wv[ky * 3 + kx] * p[dy + ky][dx + kx];
                    if (bf16) sum = round_bf16(sum);
                    if (o == 0) {
                        best = sum;
                    } else {
                        vi larger = (vi)(sum > best) | (vi)(sum != sum);  // NaN wins, as in torch
                        best = select_f(larger, sum, best);
                        won = select_i(larger, (vi){0} + o, won);
                    }
                }
                vi alive = (vi)(best > 0.0f) | (vi)(best != best);  // relu(NaN) is NaN
                vf out = select_f(alive, best, (vf){0});
                vb won8 = __builtin_convertvector(select_i(alive, won, (vi){0} + DEAD), vb);
                memcpy(arg + at + k0, &won8, sizeof won8);
                if (bf16) store_bf16((uint16_t *)y + at + k0, out);
                else store_f((float *)y + at + k0, out);
            }
        }
    }
}

// g: (n, ph, pw, c), the gradient of y, in x's dtype. Out: dwt (9, c) and db (c), float32. Each thread sums
// its own share of rows; the shares are added in thread order, so a thread count gives the same sums each run.
// Returns 0, or -1 where memory for the shares could not be had.
int convpool_backward(int bf16, const void *x, const void *g, const uint8_t *arg, float *dwt, float *db,
                      int n, int h, int w, int c, int threads) {
    int ph = (h - 2) / 2, pw = (w - 2) / 2;
    float *shares = calloc((size_t)threads * 10 * c, sizeof(float));
    if (!shares) return -1;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), used = omp_get_num_threads();
        float *mine = shares + (size_t)t * 10 * c;  // 9 rows of the kernel's gradient, then the bias's
        long rows = (long)n * ph, first = rows * t / used, last = rows * (t + 1) / used;
        for (int k0 = 0; k0 < c; k0 += LANES) {
            vf dw[9], dbias = (vf){0};
            for (int q = 0; q < 9; q++) dw[q] = (vf){0};
            for (long row = first; row < last; row++) {
                long img = row / ph;
                int i = (int)(row % ph);
                float p[4][4];
                for (int j = 0; j < pw; j++) {
                    load_patch(bf16, x, img, h, w, i, j, p);
                    long at = ((img * ph + i) * pw + j) * c + k0;
                    vf grad = bf16 ? load_bf16((const uint16_t *)g + at) : load_f((const float *)g + at);
                    vb won8;
                    memcpy(&won8, arg + at, sizeof won8);
                    vi won = __builtin_convertvector(won8, vi);
                    grad = select_f(won < DEAD, grad, (vf){0});
                    dbias += grad;
                    for (int o = 0; o < 4; o++) {
                        int dy = o >> 1, dx = o & 1;
                        vf part = select_f(won == o, grad, (vf){0});
                        for (int ky = 0; ky < 3; ky++)
                            for (int kx = 0; kx < 3; kx++) dw[ky * 3 + kx] += part * p[dy + ky][dx + kx];
                    }
                }
            }
            for (int q = 0; q < 9; q++) store_f(mine + q * c + k0, dw[q]);
            store_f(mine + 9 * c + k0, dbias);
        }
    }
    for (int k = 0; k < 10 * c; k++) {
        float sum = 0.0f;
        for (int t = 0; t < threads; t++) sum += shares[(size_t)t * 10 * c + k];
        if (k < 9 * c) dwt[k] = sum;
        else db[k - 9 * c] = sum;
    }
    free(shares);
    return 0;
}

// ---------------------------------------------------------------------------------------------- ReLU + dropout

static inline float load_one(int bf16, const void *p, long i) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store_one(int bf16, void *p, long i, float v) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

// Four 16-bit draws from word w of a stream: splitmix64 of seed + (w + 1) * golden ratio (Steele et al. 2014),
// counter-based, so any thread can draw any word and a seed gives the same mask at any thread count.
static inline uint64_t splitmix64(uint64_t seed, uint64_t w) {
    uint64_t z = seed + (w + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// out = z * scale where z > 0 and draw >= threshold, else 0: ReLU then dropout, the product rounded once to
// the activations' dtype as torch rounds relu(z) * scale. Draw i is 16-bit integer i of the stream from seed
// (seed drawn from torch's generator per call): 46 us of torch's random_ for 65,536 draws against a few here.
void relu_dropout_forward(int bf16, const void *z, uint64_t seed, int threshold, float scale, void *out, long n,
                          int threads) {
    long full = n / 32 * 32;  // 32 values (8 words of draws) a block
    #pragma omp parallel for schedule(static) num_threads(threads) if (n >= 32768)
    for (long i = 0; i < full; i += 32) {
        vq w = (vq){0, 1, 2, 3, 4, 5, 6, 7} + (uint64_t)(i / 4 + 1);
        vq x = seed + w * 0x9E3779B97F4A7C15ull;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
        x = x ^ (x >> 31);
        int16_t draws[32];
        memcpy(draws, &x, sizeof draws);  // little-endian: draw 4w + k is bits 16k.. of word w
        for (int half = 0; half < 32; half += LANES) {
            vf v = bf16 ? load_bf16((const uint16_t *)z + i + half) : load_f((const float *)z + i + half);
            vs d;
            memcpy(&d, draws + half, sizeof d);
            vi keep = (__builtin_convertvector(d, vi) >= threshold) & (vi)(v > 0.0f);
            vf r = select_f(keep | (vi)(v != v), v * scale, (vf){0});  // NaN stays NaN, as relu(NaN) * 0 does
            if (bf16) store_bf16((uint16_t *)out + i + half, round_bf16(r));
            else store_f((float *)out + i + half, r);
        }
    }
    for (long i = full; i < n; i++) {
        int16_t draw = (int16_t)(uint16_t)(splitmix64(seed, (uint64_t)(i / 4)) >> (16 * (i % 4)));
        float v = load_one(bf16, z, i);
        store_one(bf16, out, i, ((v > 0.0f && draw >= threshold) || v != v) ? v * scale : 0.0f);
    }
}

// grad_in = grad * scale where out > 0 (exactly where ReLU passed and dropout kept) or out is NaN, else 0
void relu_dropout_backward(int bf16, const void *out, const void *grad, float scale, void *grad_in, long n,
                           int threads) {
    long full = n / LANES * LANES;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n >= 32768)
    for (long i = 0; i < full; i += LANES) {
        vf o = bf16 ? load_bf16((const uint16_t *)out + i) : load_f((const float *)out + i);
        vf g = bf16 ? load_bf16((const uint16_t *)grad + i) : load_f((const float *)grad + i);
        vf r = select_f((vi)(o > 0.0f) | (vi)(o != o), g * scale, (vf){0});
        if (bf16) store_bf16((uint16_t *)grad_in + i, round_bf16(r));
        else store_f((float *)grad_in + i, r);
    }
    for (long i = full; i < n; i++) {
        float o = load_one(bf16, out, i);
        store_one(bf16, grad_in, i, (o > 0.0f || o != o) ? load_one(bf16, grad, i) * scale : 0.0f);
    }
}

// ------------------------------------------------------------------ 2x2 max pooling, ReLU, flatten and dropout

// x: (N, H, W, C) channels-last, C a multiple of 16; out: (N, C * PH * PW) in torch.flatten's (C, PH, PW) order,
// PH = H / 2 and PW = W / 2 (rows and columns past them dropped, as max_pool2d's floor); arg: the winner of each
// output's window (0-3, row-major; the first largest, as in torch's max pooling, a NaN winning), or DEAD where
// ReLU or dropout zeroed it. out = relu(max) * scale where draw o >= threshold, else 0, rounded once to the dtype
// as torch rounds dropout's product; draw o of output o is the one relu_dropout_forward gives value o.
// Each image goes through a (C, PH * PW) buffer: pooled over 16 channels at a time, then kept 32 at a time.
// Returns 0, or -1 where memory for the threads' buffers could not be had.
int pool_relu_dropout_forward(int bf16, const void *x, int n, int h, int w, int c, uint64_t seed, int threshold,
                              float scale, void *out, uint8_t *arg, int threads) {
    int ph = h / 2, pw = w / 2, cells = ph * pw;
    long per_image = (long)c * cells;
    float *pooled_all = malloc(sizeof(float) * (size_t)per_image * threads);
    uint8_t *which_all = malloc((size_t)per_image * threads);
    if (!pooled_all || !which_all) {
        free(pooled_all);
        free(which_all);
        return -1;
    }
    #pragma omp parallel num_threads(threads) if ((long)n * per_image >= 32768)
    {
        float *pooled = pooled_all + (size_t)omp_get_thread_num() * per_image;
        uint8_t *which = which_all + (size_t)omp_get_thread_num() * per_image;
        #pragma omp for schedule(static)
        for (long img = 0; img < n; img++) {
            for (int cell = 0; cell < cells; cell++) {
                int i = cell / pw, j = cell % pw;
                for (int ch = 0; ch < c; ch += LANES) {
                    vf best = (vf){0};
                    vi won = (vi){0};
                    for (int k = 0; k < 4; k++) {
                        long at = ((img * h + 2 * i + k / 2) * w + 2 * j + k % 2) * c + ch;
                        vf v = bf16 ? load_bf16((const uint16_t *)x + at) : load_f((const float *)x + at);
                        vi take = k == 0 ? ~(vi){0} : (vi)(v > best) | (vi)(v != v);
                        best = select_f(take, v, best);
                        won = select_i(take, (vi){0} + k, won);
                    }
                    for (int l = 0; l < LANES; l++) {
                        pooled[(long)(ch + l) * cells + cell] = best[l];
                        which[(long)(ch + l) * cells + cell] = (uint8_t)won[l];
                    }
                }
            }
            long base = img * per_image, o = 0;
            for (; o + 32 <= per_image && (base + o) % 4 == 0; o += 32) {
                vq word = (vq){0, 1, 2, 3, 4, 5, 6, 7} + (uint64_t)((base + o) / 4 + 1);
                vq z = seed + word * 0x9E3779B97F4A7C15ull;
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
                z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
                z = z ^ (z >> 31);
                int16_t draws[32];
                memcpy(draws, &z, sizeof draws);
                for (int half = 0; half < 32; half += LANES) {
                    vf v = load_f(pooled + o + half);
                    vs d;
                    memcpy(&d, draws + half, sizeof d);
                    vi live = ((__builtin_convertvector(d, vi) >= threshold) & (vi)(v > 0.0f)) | (vi)(v != v);
                    vf r = select_f(live, v * scale, (vf){0});
                    if (bf16) store_bf16((uint16_t *)out + base + o + half, round_bf16(r));
                    else store_f((float *)out + base + o + half, r);
                    vb kept, won;
                    memcpy(&won, which + o + half, sizeof won);
                    kept = __builtin_convertvector(select_i(live, __builtin_convertvector(won, vi), (vi){0} + DEAD), vb);
                    memcpy(arg + base + o + half, &kept, sizeof kept);
                }
            }
            for (; o < per_image; o++) {
                long at = base + o;
                int16_t draw = (int16_t)(uint16_t)(splitmix64(seed, (uint64_t)(at / 4)) >> (16 * (at % 4)));
                float v = pooled[o];
                int live = (v > 0.0f && draw >= threshold) || v != v;
                store_one(bf16, out, at, live ? v * scale : 0.0f);
                arg[at] = live ? which[o] : DEAD;
            }
        }
    }
    free(pooled_all);
    free(which_all);
    return 0;
}

// grad_in (N, H, W, C) channels-last: grad * scale at each live output's winner, 0 everywhere else (one write).
// Each image's gradient and winners are first laid out (PH * PW, C), so the writes go 16 channels at a time.
// Returns 0, or -1 where memory for the threads' buffers could not be had.
int pool_relu_dropout_backward(int bf16, const void *grad, const uint8_t *arg, float scale, int n, int h, int w,
                               int c, void *grad_in, int threads) {
    int ph = h / 2, pw = w / 2, cells = ph * pw;
    long per_image = (long)c * cells;
    float *g_all = malloc(sizeof(float) * (size_t)per_image * threads);
    int32_t *won_all = malloc(sizeof(int32_t) * (size_t)per_image * threads);
    if (!g_all || !won_all) {
        free(g_all);
        free(won_all);
        return -1;
    }
    #pragma omp parallel num_threads(threads) if ((long)n * h * w * c >= 32768)
    {
        float *g = g_all + (size_t)omp_get_thread_num() * per_image;
        int32_t *won = won_all + (size_t)omp_get_thread_num() * per_image;
        #pragma omp for schedule(static)
        for (long img = 0; img < n; img++) {
            for (int ch = 0; ch < c; ch++) {
                for (int cell = 0; cell < cells; cell++) {
                    long o = img * per_image + (long)ch * cells + cell;
                    g[(long)cell * c + ch] = load_one(bf16, grad, o) * scale;
                    won[(long)cell * c + ch] = arg[o];
                }
            }
            for (int y = 0; y < h; y++) {
                for (int xx = 0; xx < w; xx++) {
                    long at = ((img * h + y) * w + xx) * c;
                    int inside = y / 2 < ph && xx / 2 < pw;
                    long cell = inside ? (long)(y / 2) * pw + xx / 2 : 0;
                    int k = inside ? (y % 2) * 2 + xx % 2 : -1;
                    for (int ch = 0; ch < c; ch += LANES) {
                        vi mine;
                        memcpy(&mine, won + cell * c + ch, sizeof mine);
                        vf r = select_f((vi)(mine == k), load_f(g + cell * c + ch), (vf){0});
                        if (bf16) store_bf16((uint16_t *)grad_in + at + ch, round_bf16(r));
                        else store_f((float *)grad_in + at + ch, r);
                    }
                }
            }
        }
    }
    free(g_all);
    free(won_all);
    return 0;
}

// ---------------------------------------------------------------------------------------------- Adam, RMSprop

// A weight rounded to bfloat16 (nearest, ties to even; an arithmetic NaN stays NaN), branch-free to vectorise.
static inline uint16_t bf16_of_weight(float p) {
    uint32_t u;
    memcpy(&u, &p, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One Adam step (torch's: m += (1 - beta1)(g - m); v = beta2 v + (1 - beta2) g^2; p -= lr / bc1 * m /
// (sqrt(v) / sqrt(bc2) + eps)) on float32 weights from bfloat16 gradients, then the weights' bfloat16 copy.
// A plain loop the compiler vectorises (sqrtf with -fno-math-errno): written with vector types, the square
// root went lane by lane and the step took 2.7x torch's fused Adam.
void adam_bf16(float *restrict param, const uint16_t *restrict grad, float *restrict m, float *restrict v,
               uint16_t *restrict copy, long n, float lr, float beta1, float beta2, float eps, float bc1,
               float bc2_sqrt, int threads) {
    float step_size = lr / bc1, w1 = 1.0f - beta1, w2 = 1.0f - beta2;
    #pragma omp parallel for simd schedule(static) num_threads(threads) if (n >= 32768)
    for (long i = 0; i < n; i++) {
        float g = bf16_to_float(grad[i]);
        m[i] += w1 * (g - m[i]);
        v[i] = beta2 * v[i] + w2 * g * g;
        param[i] -= step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
        copy[i] = bf16_of_weight(param[i]);
    }
}

// One RMSprop step (torch's, no momentum, not centred: v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps))
// on float32 weights from bfloat16 gradients, then the weights' bfloat16 copy.
void rmsprop_bf16(float *restrict param, const uint16_t *restrict grad, float *restrict v, uint16_t *restrict copy,
                  long n, float lr, float alpha, float eps, int threads) {
    float w = 1.0f - alpha;
    #pragma omp parallel for simd schedule(static) num_threads(threads) if (n >= 32768)
    for (long i = 0; i < n; i++) {
        float g = bf16_to_float(grad[i]);
        v[i] = alpha * v[i] + w * g * g;
        param[i] -= lr * g / (sqrtf(v[i]) + eps);
        copy[i] = bf16_of_weight(param[i]);
    }
}

/* SGD without momentum from bfloat16 gradients: the float32 weights and their bfloat16 copy in one pass. */
void sgd_bf16(float *restrict param, const uint16_t *restrict grad, uint16_t *restrict copy, long n, float lr,
              int threads) {
    #pragma omp parallel for simd schedule(static) num_threads(threads) if (n >= 32768)
    for (long i = 0; i < n; i++) {
        param[i] -= lr * bf16_to_float(grad[i]);
        copy[i] = bf16_of_weight(param[i]);
    }
}

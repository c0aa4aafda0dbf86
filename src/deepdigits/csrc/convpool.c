// A one-input-channel 3x3 convolution, 2x2 max pooling (stride 2) and ReLU as one pass, forward and weight
// gradient, for deepdigits.fused. The convolution's output (N x 26 x 26 x C for MNIST) is never stored: each
// pooled value is the largest of its window's four convolution outputs, computed from a 4x4 patch of input.
//
// Arithmetic as torch's bfloat16 autocast does it (bf16 != 0): the weights and bias arrive already rounded to
// bfloat16, products are summed in float32, and each convolution output is rounded to bfloat16 before the
// window's four are compared; the first largest wins, as in torch's max pooling. The weight gradient is summed
// in float32. Vectors are GCC/Clang vector extensions over 16 channels, so one source builds for AVX-512,
// AVX2 or NEON (-march=native). Threads: OpenMP, the runtime torch has loaded (libgomp.so.1 by soname).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint8_t vb __attribute__((vector_size(16)));
#define LANES 16
#define DEAD 4  // arg value of a pooled output that ReLU zeroed: no gradient flows through it

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
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
                        vi larger = (vi)(sum > best);
                        best = select_f(larger, sum, best);
                        won = select_i(larger, (vi){0} + o, won);
                    }
                }
                vi alive = (vi)(best > 0.0f);
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

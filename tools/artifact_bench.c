/* Times a library made by `egret compile`, or soaks it.
 *
 * Build with -DMODEL=name (the C prefix) and -DMODEL_HEADER='"name.h"',
 * linked against libname.so (tools/bench_artifact.sh does all of this).
 *
 *   artifact_bench time THREADS WARMUP ITERS   median/min/max ms per run
 *   artifact_bench soak THREADS RUNS           RSS after warm-up and its drift
 *
 * Inputs are deterministic: floats in [-1, 1), integers 1 (a valid token
 * id, mask value and type id for every text model in the zoo), so that
 * every run does the same work. Each run goes through one context, as a
 * serving thread would.
 *
 * A library that keeps symbolic dims runs at the values EGRET_DIMS gives
 * (`batch=1 sequence=128 past_sequence=0`): each input dim is its
 * expression's value, for expressions that are sums of dims and integers
 * (`past_sequence + sequence`), as exporters write them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include MODEL_HEADER

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(x) CAT(MODEL, x)

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* The value of a dim expression (a sum of names and integers) at the
 * values in `dims` ("name=value ..."); exits if a name has none. */
static int64_t dim_value(const char *expr, const char *dims) {
    int64_t total = 0;
    char term[256];
    const char *p = expr;
    while (*p) {
        size_t n = 0;
        while (*p == ' ' || *p == '+') p++;
        while (*p && *p != ' ' && *p != '+' && n + 1 < sizeof term) term[n++] = *p++;
        term[n] = 0;
        if (!n) break;
        if (term[0] >= '0' && term[0] <= '9') {
            total += atoll(term);
            continue;
        }
        const char *at = dims;
        int found = 0;
        while (at && (at = strstr(at, term))) {
            if ((at == dims || at[-1] == ' ') && at[n] == '=') {
                total += atoll(at + n + 1);
                found = 1;
                break;
            }
            at += n;
        }
        if (!found) {
            fprintf(stderr, "EGRET_DIMS gives no value for `%s` (in `%s`)\n", term, expr);
            exit(2);
        }
    }
    return total;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill(void *buf, const char *dtype, size_t bytes) {
    size_t i;
    uint32_t state = 12345;
    if (strcmp(dtype, "f32") == 0) {
        float *f = buf;
        for (i = 0; i < bytes / 4; i++) {
            state = state * 1664525u + 1013904223u;
            f[i] = (float)(state >> 8) / (float)(1u << 23) - 1.0f;
        }
    } else if (strcmp(dtype, "i64") == 0) {
        for (i = 0; i < bytes / 8; i++) ((int64_t *)buf)[i] = 1;
    } else if (strcmp(dtype, "i32") == 0) {
        for (i = 0; i < bytes / 4; i++) ((int32_t *)buf)[i] = 1;
    } else {
        memset(buf, 1, bytes);
    }
}

/* Resident set size in KiB, from /proc/self/statm. */
static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * 4;
}

int main(int argc, char **argv) {
    size_t ni = FN(_num_inputs)(), no = FN(_num_outputs)(), i;
    int soak = argc == 4 && strcmp(argv[1], "soak") == 0;
    if (!(argc == 5 && strcmp(argv[1], "time") == 0) && !soak) {
        fprintf(stderr, "usage: %s time THREADS WARMUP ITERS | soak THREADS RUNS\n", argv[0]);
        return 2;
    }
    if (FN(_abi_version)() != MODEL_ABI) {
        fprintf(stderr, "library ABI %d, header ABI %d\n", FN(_abi_version)(), MODEL_ABI);
        return 1;
    }
    int threads = atoi(argv[2]);
    const void **in = malloc((ni + 1) * sizeof *in);
    void **out = malloc((no + 1) * sizeof *out);
    CAT(MODEL, _model) *model = NULL;
    CAT(MODEL, _context) *ctx = NULL;
    int s = FN(_create)(&model);
    if (!s) s = FN(_context_create)(model, threads, &ctx);
    if (s) {
        fprintf(stderr, "create: %s\n", FN(_status_message)(s));
        return 1;
    }
    if (FN(_num_dims)() > 0) {
        const char *dims = getenv("EGRET_DIMS");
        const int64_t **shapes = malloc((ni + 1) * sizeof *shapes);
        if (!dims) {
            fprintf(stderr, "the library keeps symbolic dims: give their values in EGRET_DIMS\n");
            return 2;
        }
        for (i = 0; i < ni; i++) {
            size_t k, rank = FN(_input_rank)(i);
            int64_t *d = malloc((rank + 1) * sizeof *d);
            for (k = 0; k < rank; k++) {
                const char *param = FN(_input_dim_param)(i, k);
                d[k] = param ? dim_value(param, dims) : FN(_input_dims)(i)[k];
            }
            shapes[i] = d;
        }
        if ((s = FN(_context_set_input_dims)(ctx, shapes)) != 0) {
            fprintf(stderr, "set_input_dims: %s (%s)\n", FN(_status_message)(s), FN(_context_error)(ctx));
            return 1;
        }
    }
    for (i = 0; i < ni; i++) {
        size_t bytes = FN(_context_input_bytes)(ctx, i);
        void *b = malloc(bytes + 1);
        fill(b, FN(_input_dtype)(i), bytes);
        in[i] = b;
    }
    for (i = 0; i < no; i++) out[i] = malloc(FN(_context_output_bytes)(ctx, i) + 1);
    if (soak) {
        long runs = atol(argv[3]), warm = runs / 10, base = 0, peak = 0, r;
        for (r = 0; r < runs; r++) {
            if ((s = FN(_context_run)(ctx, in, (void *const *)out)) != 0) {
                fprintf(stderr, "run %ld: %s\n", r, FN(_status_message)(s));
                return 1;
            }
            if (r + 1 == warm) base = peak = rss_kib();
            if (r + 1 > warm && (r + 1) % 100 == 0) {
                long now = rss_kib();
                if (now > peak) peak = now;
            }
        }
        long last = rss_kib();
        printf("runs %ld threads %d rss_after_warmup_kib %ld rss_peak_kib %ld rss_end_kib %ld growth_kib %ld\n", runs,
               FN(_context_threads)(ctx), base, peak, last, peak - base);
    } else {
        int warmup = atoi(argv[3]), iters = atoi(argv[4]);
        double *t = malloc((iters + 1) * sizeof *t);
        for (i = 0; i < (size_t)warmup + (size_t)iters; i++) {
            double start = now_ms();
            if ((s = FN(_context_run)(ctx, in, (void *const *)out)) != 0) {
                fprintf(stderr, "run: %s\n", FN(_status_message)(s));
                return 1;
            }
            if (i >= (size_t)warmup) t[i - warmup] = now_ms() - start;
        }
        qsort(t, iters, sizeof *t, cmp_double);
        printf("median_ms %.3f min_ms %.3f max_ms %.3f threads %d\n", t[iters / 2], t[0], t[iters - 1],
               FN(_context_threads)(ctx));
    }
    FN(_context_destroy)(ctx);
    FN(_destroy)(model);
    return 0;
}

/* Runs a library made by `egret compile` from 4 threads at once, each with
 * its own context on one model and its own inputs, and checks that every
 * run gives exactly the single-threaded result.
 *
 * Build with -DMODEL=name, -DMODEL_HEADER='"name.h"' and -lpthread.
 * Usage: concurrent IN_0.bin ... IN_{n-1}.bin
 * Thread t's inputs are the given ones changed by t: floats scaled by
 * 1 + t/4, integers rotated by t places (so token ids, masks and type ids
 * stay valid). Threads 1 and 3 run with two threads per run, so contexts
 * with pools run beside contexts without.
 */
#include <pthread.h>
#include <stdint.h>

#include "program.h"

#define THREADS 4
#define RUNS 50

static CAT(MODEL, _model) *model;
static const void **inputs[THREADS];
static void **expected[THREADS];

static void *vary(const void *given, size_t i, int t) {
    size_t bytes = FN(_input_bytes)(i), n, k, elem = 1;
    const char *dtype = FN(_input_dtype)(i);
    unsigned char *out = malloc(bytes ? bytes : 1);
    if (strcmp(dtype, "f32") == 0) {
        for (k = 0; k < bytes / 4; k++) ((float *)out)[k] = ((const float *)given)[k] * (1.0f + t / 4.0f);
        return out;
    }
    if (strcmp(dtype, "i64") == 0 || strcmp(dtype, "f64") == 0 || strcmp(dtype, "u64") == 0) elem = 8;
    if (strcmp(dtype, "i32") == 0 || strcmp(dtype, "u32") == 0) elem = 4;
    n = bytes / elem;
    for (k = 0; k < n; k++) memcpy(out + k * elem, (const unsigned char *)given + ((k + t) % n) * elem, elem);
    return out;
}

static void **alloc_outputs(void) {
    size_t j, no = FN(_num_outputs)();
    void **out = malloc((no + 1) * sizeof *out);
    for (j = 0; j < no; j++) out[j] = malloc(FN(_output_bytes)(j) + 1);
    return out;
}

static void *serve(void *arg) {
    int t = (int)(intptr_t)arg, r, s;
    size_t j;
    CAT(MODEL, _context) *ctx = NULL;
    void **out = alloc_outputs();
    if ((s = FN(_context_create)(model, 1 + t % 2, &ctx)) != 0) {
        fprintf(stderr, "thread %d: context_create: %s\n", t, FN(_status_message)(s));
        return (void *)1;
    }
    for (r = 0; r < RUNS; r++) {
        for (j = 0; j < FN(_num_outputs)(); j++) memset(out[j], 0xa5, FN(_output_bytes)(j));
        if ((s = FN(_context_run)(ctx, inputs[t], out)) != 0) {
            fprintf(stderr, "thread %d run %d: %s\n", t, r, FN(_status_message)(s));
            return (void *)1;
        }
        for (j = 0; j < FN(_num_outputs)(); j++)
            if (memcmp(out[j], expected[t][j], FN(_output_bytes)(j)) != 0) {
                fprintf(stderr, "thread %d run %d: output %zu differs from the single-threaded result\n", t, r, j);
                return (void *)1;
            }
    }
    FN(_context_destroy)(ctx);
    return 0;
}

int main(int argc, char **argv) {
    size_t ni = FN(_num_inputs)(), i;
    pthread_t threads[THREADS];
    int t, s, failed = 0;
    if ((size_t)argc != ni + 1) {
        fprintf(stderr, "usage: %s IN_0.bin ... (%zu inputs)\n", argv[0], ni);
        return 2;
    }
    if ((s = FN(_create)(&model)) != 0) {
        fprintf(stderr, "create: %s\n", FN(_status_message)(s));
        return 1;
    }
    for (t = 0; t < THREADS; t++) {
        inputs[t] = malloc((ni + 1) * sizeof *inputs[t]);
        for (i = 0; i < ni; i++) {
            void *given = read_file(argv[1 + i], FN(_input_bytes)(i));
            inputs[t][i] = vary(given, i, t);
            free(given);
        }
        /* The single-threaded result, on the model's own context. */
        expected[t] = alloc_outputs();
        if ((s = FN(_run)(model, inputs[t], expected[t])) != 0) {
            fprintf(stderr, "reference run %d: %s\n", t, FN(_status_message)(s));
            return 1;
        }
    }
    if (FN(_num_outputs)() > 0 && memcmp(expected[0][0], expected[1][0], FN(_output_bytes)(0)) == 0 &&
        FN(_output_bytes)(0) > 0) {
        fprintf(stderr, "threads 0 and 1 have the same result: their inputs do not differ enough to test anything\n");
        return 1;
    }
    for (t = 0; t < THREADS; t++) pthread_create(&threads[t], NULL, serve, (void *)(intptr_t)t);
    for (t = 0; t < THREADS; t++) {
        void *r;
        pthread_join(threads[t], &r);
        failed |= r != 0;
    }
    FN(_destroy)(model);
    if (!failed) printf("%d threads x %d runs: every result equal to the single-threaded one\n", THREADS, RUNS);
    return failed;
}

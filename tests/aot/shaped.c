/* A C program that runs one library made by `egret compile` on inputs of
 * several shapes, as a server of a model with symbolic dims does.
 *
 * Build with -DMODEL=name (the C prefix) and -DMODEL_HEADER='"name.h"'.
 * Usage: shaped SETS_FILE OUT_DIR
 * SETS_FILE holds, for each data set, a line `set`, then one line per input
 * (in the library's order): `PATH RANK D0 D1 ...`. For each set, the program
 * gives a two-thread context and the model's own context the inputs' dims,
 * runs on both, checks they agree byte for byte, and writes
 * OUT_DIR/set_S_output_J.bin; it prints `set S output J DIMS...` for each
 * output, or `set S refused: MESSAGE` where the library refused the dims
 * (the caller decides whether it should have). Before the sets it checks
 * the refusals every library must make: a run on a context whose sizes
 * were never set (when the model has symbolic dims), and a negative dim.
 */
#include "program.h"

#define MAX_INPUTS 64
#define MAX_RANK 8

static void fail(const char *what, int status, const CAT(MODEL, _context) *c) {
    fprintf(stderr, "%s: %s (%s)\n", what, FN(_status_message)(status), c ? FN(_context_error)(c) : "");
    exit(1);
}

int main(int argc, char **argv) {
    size_t ni = FN(_num_inputs)(), no = FN(_num_outputs)(), i, j;
    if (argc != 3 || ni > MAX_INPUTS) {
        fprintf(stderr, "usage: %s SETS_FILE OUT_DIR\n", argv[0]);
        return 2;
    }
    FILE *sets = fopen(argv[1], "r");
    if (!sets) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    CAT(MODEL, _model) *m = NULL;
    CAT(MODEL, _context) *c = NULL;
    int s = FN(_create)(&m);
    if (s) fail("create", s, NULL);
    s = FN(_context_create)(m, 2, &c);
    if (s) fail("context_create", s, NULL);

    const void *in[MAX_INPUTS + 1];
    void *out[MAX_INPUTS + 1], *out_own[MAX_INPUTS + 1];
    int64_t dims[MAX_INPUTS + 1][MAX_RANK + 1];
    const int64_t *dim_ptrs[MAX_INPUTS + 1];
    for (i = 0; i < ni; i++) dim_ptrs[i] = dims[i];

    /* Sizes must be set before a run on a model with symbolic dims. */
    if (FN(_num_dims)() > 0) {
        void *dummy = malloc(1);
        for (i = 0; i < no; i++) out[i] = dummy;
        for (i = 0; i < ni; i++) in[i] = dummy;
        s = FN(_context_run)(c, in, out);
        if (s != CAT(MODEL_UP, _ERROR_SHAPE) || !*FN(_context_error)(c)) {
            fprintf(stderr, "a run before any sizes were set gave status %d, not a shape error\n", s);
            return 1;
        }
        free(dummy);
    }

    char word[4096];
    int set = -1;
    while (fscanf(sets, "%4095s", word) == 1) {
        if (strcmp(word, "set") != 0) {
            fprintf(stderr, "expected `set` in %s\n", argv[1]);
            return 2;
        }
        set++;
        char paths[MAX_INPUTS][4096];
        for (i = 0; i < ni; i++) {
            size_t rank, k;
            if (fscanf(sets, "%4095s %zu", paths[i], &rank) != 2 || rank != FN(_input_rank)(i)) {
                fprintf(stderr, "set %d input %zu: bad line\n", set, i);
                return 2;
            }
            for (k = 0; k < rank; k++)
                if (fscanf(sets, "%lld", (long long *)&dims[i][k]) != 1) return 2;
        }
        /* A negative dim is refused, and leaves the context without sizes. */
        if (ni > 0 && FN(_input_rank)(0) > 0) {
            int64_t keep = dims[0][0];
            dims[0][0] = -1;
            s = FN(_context_set_input_dims)(c, dim_ptrs);
            if (s != CAT(MODEL_UP, _ERROR_SHAPE) || !*FN(_context_error)(c)) {
                fprintf(stderr, "a negative dim gave status %d, not a shape error\n", s);
                return 1;
            }
            dims[0][0] = keep;
        }
        s = FN(_context_set_input_dims)(c, dim_ptrs);
        if (s == CAT(MODEL_UP, _ERROR_SHAPE)) {
            printf("set %d refused: %s\n", set, FN(_context_error)(c));
            continue;
        }
        if (s) fail("context_set_input_dims", s, c);
        s = FN(_context_set_input_dims)(FN(_model_context)(m), dim_ptrs);
        if (s) fail("context_set_input_dims on the model's context", s, FN(_model_context)(m));
        for (i = 0; i < ni; i++) {
            const int64_t *d = FN(_context_input_dims)(c, i);
            size_t k;
            for (k = 0; k < FN(_input_rank)(i); k++)
                if (d[k] != dims[i][k]) {
                    fprintf(stderr, "context_input_dims disagrees with the dims given\n");
                    return 1;
                }
            in[i] = read_file(paths[i], FN(_context_input_bytes)(c, i));
        }
        for (j = 0; j < no; j++) {
            out[j] = malloc(FN(_context_output_bytes)(c, j) + 1);
            out_own[j] = malloc(FN(_context_output_bytes)(c, j) + 1);
        }
        s = FN(_context_run)(c, in, out);
        if (s) fail("context_run", s, c);
        s = FN(_run)(m, in, out_own);
        if (s) fail("run", s, FN(_model_context)(m));
        for (j = 0; j < no; j++) {
            size_t bytes = FN(_context_output_bytes)(c, j), k;
            const int64_t *d = FN(_context_output_dims)(c, j);
            if (memcmp(out[j], out_own[j], bytes) != 0) {
                fprintf(stderr, "set %d: the two contexts disagree on output %zu\n", set, j);
                return 1;
            }
            char path[4200];
            snprintf(path, sizeof path, "%s/set_%d_output_%zu.bin", argv[2], set, j);
            FILE *f = fopen(path, "wb");
            if (!f || (bytes && fwrite(out[j], 1, bytes, f) != bytes)) {
                fprintf(stderr, "cannot write %s\n", path);
                return 1;
            }
            fclose(f);
            printf("set %d output %zu", set, j);
            for (k = 0; k < FN(_output_rank)(j); k++) printf(" %lld", (long long)d[k]);
            printf("\n");
            free(out[j]);
            free(out_own[j]);
        }
        for (i = 0; i < ni; i++) free((void *)in[i]);
    }
    fclose(sets);
    FN(_context_destroy)(c);
    FN(_destroy)(m);
    return 0;
}

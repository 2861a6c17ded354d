/* A C program that uses a library made by `egret compile`.
 *
 * Build with -DMODEL=name (the C prefix) and -DMODEL_HEADER='"name.h"'.
 * Usage: driver IN_0.bin ... IN_{n-1}.bin OUT_DIR
 * Reads each input's raw bytes, runs the model through the named entry
 * point (inputs given in reverse order) and the positional one, checks the
 * two agree byte for byte, and writes OUT_DIR/output_J.bin.
 */
#include "program.h"

int main(int argc, char **argv) {
    size_t ni = FN(_num_inputs)(), no = FN(_num_outputs)(), i;
    if ((size_t)argc != ni + 2) {
        fprintf(stderr, "usage: %s IN_0.bin ... OUT_DIR (%zu inputs)\n", argv[0], ni);
        return 2;
    }
    const void **in = malloc((ni + 1) * sizeof *in);
    const void **in_rev = malloc((ni + 1) * sizeof *in_rev);
    const char **names_rev = malloc((ni + 1) * sizeof *names_rev);
    void **out = malloc((no + 1) * sizeof *out);
    void **out_pos = malloc((no + 1) * sizeof *out_pos);
    const char **out_names = malloc((no + 1) * sizeof *out_names);
    for (i = 0; i < ni; i++) {
        in[i] = read_file(argv[1 + i], FN(_input_bytes)(i));
        in_rev[ni - 1 - i] = in[i];
        names_rev[ni - 1 - i] = FN(_input_name)(i);
        if (FN(_input_index)(FN(_input_name)(i)) != (int)i) {
            fprintf(stderr, "input_index disagrees with input_name\n");
            return 1;
        }
    }
    for (i = 0; i < no; i++) {
        out[i] = malloc(FN(_output_bytes)(i) + 1);
        out_pos[i] = malloc(FN(_output_bytes)(i) + 1);
        out_names[i] = FN(_output_name)(i);
    }
    CAT(MODEL, _model) *m = NULL;
    int s = FN(_create)(&m);
    if (s) {
        fprintf(stderr, "create: %s\n", FN(_status_message)(s));
        return 1;
    }
    s = FN(_run_named)(m, ni, names_rev, in_rev, no, out_names, out);
    if (s) {
        fprintf(stderr, "run_named: %s\n", FN(_status_message)(s));
        return 1;
    }
    s = FN(_run)(m, in, out_pos);
    if (s) {
        fprintf(stderr, "run: %s\n", FN(_status_message)(s));
        return 1;
    }
    /* A wrong name must be refused, not crash. */
    if (ni > 0) {
        const char *bad = "no_such_input";
        const char **bad_names = malloc(ni * sizeof *bad_names);
        memcpy(bad_names, names_rev, ni * sizeof *bad_names);
        bad_names[0] = bad;
        if (FN(_run_named)(m, ni, bad_names, in_rev, no, out_names, out) == 0) {
            fprintf(stderr, "run_named accepted an unknown input name\n");
            return 1;
        }
        free(bad_names);
    }
    for (i = 0; i < no; i++) {
        if (memcmp(out[i], out_pos[i], FN(_output_bytes)(i)) != 0) {
            fprintf(stderr, "named and positional runs disagree on output %zu\n", i);
            return 1;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/output_%zu.bin", argv[ni + 1], i);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(out[i], 1, FN(_output_bytes)(i), f) != FN(_output_bytes)(i)) {
            fprintf(stderr, "cannot write %s\n", path);
            return 1;
        }
        fclose(f);
    }
    FN(_destroy)(m);
    /* Everything freed, so that valgrind's leak check sees only the library's. */
    for (i = 0; i < ni; i++) free((void *)in[i]);
    for (i = 0; i < no; i++) {
        free(out[i]);
        free(out_pos[i]);
    }
    free(in);
    free(in_rev);
    free(names_rev);
    free(out);
    free(out_pos);
    free(out_names);
    return 0;
}

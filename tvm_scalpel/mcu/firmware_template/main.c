/* The runner's main (written by tvm-scalpel run): reads input rows from the host file
 * input.bin through semihosting, calls scalpel_model_run once per row, writes output.bin, the
 * model's return code and the timer ticks of each call to counts.bin.
 *
 * Counting: qemu runs with -icount, so its virtual clock advances by a fixed time per
 * instruction, and the board's timers (clocked from that clock) count instructions. The fine
 * timer (CMSDK APB timer 0, 25 MHz, 32 bits) is read just before and just after the call; a
 * coarse one (the dual timer's first counter, divided by 256) tells the runner how often the
 * fine one wrapped. A call to an empty function, timed the same way, is the baseline the runner
 * subtracts, so an empty model counts 0.
 */
#include <stdint.h>
#include <stdio.h>

#include "model.h"
#include "runner.h"

/* model.json and model.h must agree on the sizes (the runner passes model.json's as -D) */
_Static_assert(SCALPEL_INPUT_SIZE == RUNNER_INPUT_SIZE, "SCALPEL_INPUT_SIZE differs from model.json");
_Static_assert(SCALPEL_OUTPUT_SIZE == RUNNER_OUTPUT_SIZE, "SCALPEL_OUTPUT_SIZE differs from model.json");

#define FINE ((volatile uint32_t *)0x40000000u)   /* CTRL, VALUE, RELOAD */
#define COARSE ((volatile uint32_t *)0x40002000u) /* LOAD, VALUE, CONTROL */

typedef int (*model_fn)(const float *in, float *out);

static float input[SCALPEL_INPUT_SIZE];
static float output[SCALPEL_OUTPUT_SIZE];

/* the baseline: what a call costs that does nothing */
__attribute__((noinline)) static int empty_model(const float *in, float *out) {
    (void)in;
    (void)out;
    return 0;
}

/* Both timers count down. The called function comes through a volatile pointer, so the
 * sequence around the call is the same for the model and for the baseline. */
__attribute__((noinline)) static void timed_call(model_fn volatile *fn, uint32_t record[3]) {
    uint32_t coarse0 = COARSE[1];
    uint32_t fine0 = FINE[1];
    int rc = (*fn)(input, output);
    uint32_t fine1 = FINE[1];
    uint32_t coarse1 = COARSE[1];
    record[0] = fine0 - fine1;
    record[1] = coarse0 - coarse1;
    record[2] = (uint32_t)rc;
}

static void start_timers(void) {
    FINE[2] = 0xFFFFFFFFu; /* reload */
    FINE[1] = 0xFFFFFFFFu; /* value */
    FINE[0] = 1u;          /* enable, no interrupt */
    COARSE[0] = 0xFFFFFFFFu;
    COARSE[2] = 0x80u | (2u << 2) | 0x2u; /* enable, free-running, prescale /256, 32-bit */
}

static int write_all(FILE *f, const void *data, size_t size, size_t count) {
    return fwrite(data, size, count, f) == count;
}

int main(void) {
    FILE *in = fopen("input.bin", "rb");
    FILE *out = fopen("output.bin", "wb");
    FILE *counts = fopen("counts.bin", "wb");
    if (!in || !out || !counts) return RUNNER_EXIT_NO_FILE;
    /* unbuffered: after a fault (_exit, no flush) the runner still sees which call it was */
    setvbuf(counts, NULL, _IONBF, 0);
    start_timers();

    uint32_t record[3];
    model_fn volatile fn = empty_model;
    timed_call(&fn, record);
    if (!write_all(counts, record, sizeof record[0], 3)) return RUNNER_EXIT_SHORT_WRITE;

    fn = scalpel_model_run;
    while (fread(input, sizeof input[0], SCALPEL_INPUT_SIZE, in) == SCALPEL_INPUT_SIZE) {
        timed_call(&fn, record);
        if (!write_all(counts, record, sizeof record[0], 3)) return RUNNER_EXIT_SHORT_WRITE;
        if (record[2] != 0) return RUNNER_EXIT_MODEL_FAILED;
        if (!write_all(out, output, sizeof output[0], SCALPEL_OUTPUT_SIZE)) return RUNNER_EXIT_SHORT_WRITE;
    }
    if (fclose(out) != 0 || fclose(counts) != 0) return RUNNER_EXIT_SHORT_WRITE;
    fclose(in);
    return RUNNER_EXIT_OK;
}

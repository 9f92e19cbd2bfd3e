/* Shared by the runner's startup.c and main.c; the exit codes are read by firmware.py. */
#ifndef SCALPEL_RUNNER_H
#define SCALPEL_RUNNER_H

#define RUNNER_EXIT_OK 0
#define RUNNER_EXIT_NO_FILE 64     /* a semihosting file could not be opened */
#define RUNNER_EXIT_SHORT_WRITE 65 /* a semihosting write came back short */
#define RUNNER_EXIT_MODEL_FAILED 66 /* scalpel_model_run returned non-zero */
#define RUNNER_EXIT_FAULT 70       /* a CPU fault (HardFault, BusFault, UsageFault, ...) */

#endif

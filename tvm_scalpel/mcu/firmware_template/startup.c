/* Startup for the Cortex-M4F under qemu-system-arm -M mps2-an386 (written by tvm-scalpel run).
 *
 * The vector table sits at 0x0 (where the board boots from), the reset handler enables the FPU
 * before any C code runs (the model's float code would fault otherwise), zeroes .bss, opens
 * newlib's semihosting handles and calls main; main's return value becomes qemu's exit code.
 * .data is linked where it is loaded (the board's code memory is RAM), so nothing is copied.
 */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "runner.h"

extern uint32_t __stack_top, __bss_start__, __bss_end__;
extern void initialise_monitor_handles(void);
int main(void);

/* -nostartfiles: newlib's exit() still calls these */
void _init(void) {}
void _fini(void) {}

__attribute__((used, noreturn)) static void start_c(void) {
    for (uint32_t *p = &__bss_start__; p < &__bss_end__;) *p++ = 0;
    initialise_monitor_handles();
    exit(main());
}

/* naked and in assembly: the compiler may not place a float instruction before the FPU is on */
__attribute__((naked, noreturn)) void reset_handler(void) {
    __asm volatile(
        "ldr r0, =0xE000ED88\n"          /* CPACR */
        "ldr r1, [r0]\n"
        "orr r1, r1, #(0xF << 20)\n"     /* CP10 and CP11: full access */
        "str r1, [r0]\n"
        "dsb\n"
        "isb\n"
        "b start_c\n");
}

/* any fault (a bad pointer, an unaligned access, an undefined instruction): a known exit code,
 * so the runner can say what happened instead of waiting for a timeout */
__attribute__((noreturn)) static void fault_handler(void) { _exit(RUNNER_EXIT_FAULT); }

__attribute__((section(".vectors"), used)) static const void *const vectors[16] = {
    &__stack_top,  reset_handler,
    fault_handler, /* NMI */
    fault_handler, /* HardFault */
    fault_handler, /* MemManage */
    fault_handler, /* BusFault */
    fault_handler, /* UsageFault */
    0, 0, 0, 0,
    fault_handler, /* SVCall */
    fault_handler, /* DebugMonitor */
    0,
    fault_handler, /* PendSV */
    fault_handler, /* SysTick */
};

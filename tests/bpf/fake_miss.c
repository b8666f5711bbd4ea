/*
 * Test-only, appended after sched.c and snapshot.c: a uprobe on libc's getpgrp makes the
 * accounting believe the calling thread's current switch-in was never reported, the way
 * this project's kernel sometimes leaves one out. The thread is running (the probe runs
 * on it), so nothing else writes its entry meanwhile.
 */
int fake_missed_switch_in(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID)
        return 0;
    u32 tid = (u32)id;
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (!a || a->state != SCHED_ST_ON_CPU)
        return 0;
    a->state = SCHED_ST_RUNNABLE;
    a->flags &= ~SCHED_F_IN_SEEN;
    u32 cpu = bpf_get_smp_processor_id();
    struct sched_cpu_slot *slot = sched_cpu_cur.lookup(&cpu);
    if (slot && slot->tid == tid)
        slot->tid = 0;
    return 0;
}

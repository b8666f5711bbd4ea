/*
 * Test-only: span-like windows without the capture engine. Appended to bpf/sched.c.
 * The target calls getppid() right before and right after a phase; a uprobe on its libc's
 * getppid (attached for the target's pid) snapshots the calling thread with sched_read(),
 * exactly as the capture program does at a span's entry and exit.
 */
struct snap_event {
    u32 tid;
    u32 pad;
    struct sched_acct acct;
};

BPF_RINGBUF_OUTPUT(snap_events, 64);

int snap_marker(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct snap_event *e = snap_events.ringbuf_reserve(sizeof(struct snap_event));
    if (!e)
        return 0;
    e->tid = (u32)id;
    e->pad = 0;
    sched_read((u32)id, now, &e->acct);
    snap_events.ringbuf_submit(e, 0);
    return 0;
}

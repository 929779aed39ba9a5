// The kernel operations ligera's jail cannot do without, timed one by one on
// this host (median of RUNS, in a fresh child each time): what the jail's
// start-up cost is made of, below anything ligera's own code does.
//
//   gcc -O2 -o /tmp/jail-ops resources/bench/jail-ops.c && sudo /tmp/jail-ops
//
// Needs root (namespaces, cgroups). Cgroups: the v1 memory and cpu
// hierarchies when mounted (the hybrid layout), else cgroup v2.
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RUNS 41

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v) {
    qsort(v, RUNS, sizeof *v, cmp);
    return v[RUNS / 2];
}

// Runs `op` in a fresh child RUNS times; returns the median of the times
// `op` reports (or of the time to fork, exit and reap it when op is NULL).
static double in_child(double (*op)(void)) {
    double v[RUNS];
    for (int i = 0; i < RUNS; i++) {
        int p[2];
        if (pipe(p) != 0) exit(1);
        double start = now_ms();
        pid_t pid = fork();
        if (pid == 0) {
            double d = op ? op() : 0;
            if (write(p[1], &d, sizeof d) != sizeof d) _exit(1);
            _exit(0);
        }
        double d = -1;
        if (read(p[0], &d, sizeof d) != sizeof d) d = -1;
        waitpid(pid, NULL, 0);
        if (!op) d = now_ms() - start;
        if (d < 0) return -1;
        v[i] = d;
        close(p[0]);
        close(p[1]);
    }
    return median(v);
}

static double timed_unshare(int flags) {
    double a = now_ms();
    if (unshare(flags) != 0) return -1;
    return now_ms() - a;
}

static double net(void) { return timed_unshare(CLONE_NEWNET); }
static double mnt(void) { return timed_unshare(CLONE_NEWNS); }
static double ipc_uts(void) { return timed_unshare(CLONE_NEWIPC | CLONE_NEWUTS); }
static double pidns(void) { return timed_unshare(CLONE_NEWPID); }

// A tmpfs with one bind mount in it, in a new mount namespace: the shape of
// the jail's root (timed once the namespace exists).
static double mounts(void) {
    if (unshare(CLONE_NEWNS) != 0) return -1;
    double a = now_ms();
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return -1;
    char dir[] = "/tmp/jail-ops.XXXXXX";
    if (!mkdtemp(dir)) return -1;
    int r = mount("tmpfs", dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    char dev[64];
    snprintf(dev, sizeof dev, "%s/kvm", dir);
    if (r == 0) {
        FILE *f = fopen(dev, "w");
        if (f) fclose(f);
        r = mount("/dev/null", dev, NULL, MS_BIND, NULL);
    }
    umount2(dir, MNT_DETACH);
    double d = now_ms() - a;
    rmdir(dir);
    return r == 0 ? d : -1;
}

static const char *cgroup_dirs[2];

// mkdir and rmdir of one cgroup, as the jail does for each controller.
static double cgroup_cost(const char *base) {
    double v[RUNS];
    char dir[256];
    snprintf(dir, sizeof dir, "%s/jail-ops-%d", base, getpid());
    for (int i = 0; i < RUNS; i++) {
        double a = now_ms();
        if (mkdir(dir, 0755) != 0 || rmdir(dir) != 0) return -1;
        v[i] = now_ms() - a;
    }
    return median(v);
}

int main(void) {
    if (geteuid() != 0) {
        fprintf(stderr, "jail-ops: needs root (namespaces, cgroups)\n");
        return 2;
    }
    struct stat st;
    if (stat("/sys/fs/cgroup/memory/cgroup.procs", &st) == 0) {
        cgroup_dirs[0] = "/sys/fs/cgroup/memory";
        cgroup_dirs[1] = "/sys/fs/cgroup/cpu";
    } else {
        cgroup_dirs[0] = "/sys/fs/cgroup";
    }
    fprintf(stderr, "jail-ops: %d runs of each operation...\n", RUNS);
    struct {
        const char *what;
        double ms;
    } rows[8];
    int n = 0;
    rows[n].what = "fork, exit and reap a process";
    rows[n++].ms = in_child(NULL);
    rows[n].what = "unshare(CLONE_NEWNET)";
    rows[n++].ms = in_child(net);
    rows[n].what = "unshare(CLONE_NEWNS)";
    rows[n++].ms = in_child(mnt);
    rows[n].what = "unshare(CLONE_NEWIPC|CLONE_NEWUTS)";
    rows[n++].ms = in_child(ipc_uts);
    rows[n].what = "unshare(CLONE_NEWPID)";
    rows[n++].ms = in_child(pidns);
    rows[n].what = "tmpfs + file + bind mount + detach (in a mount namespace)";
    rows[n++].ms = in_child(mounts);
    for (int c = 0; c < 2 && cgroup_dirs[c]; c++) {
        static char label[2][96];
        snprintf(label[c], sizeof label[c], "cgroup mkdir + rmdir in %s", cgroup_dirs[c]);
        rows[n].what = label[c];
        rows[n++].ms = cgroup_cost(cgroup_dirs[c]);
    }
    double total = 0;
    printf("%-62s %s\n", "operation (median)", "ms");
    for (int i = 0; i < n; i++) {
        if (rows[i].ms < 0) {
            printf("%-62s failed: %s\n", rows[i].what, strerror(errno));
            continue;
        }
        printf("%-62s %.3f\n", rows[i].what, rows[i].ms);
        total += rows[i].ms;
    }
    printf("%-62s %.3f\n", "sum (what a jail with cgroups cannot avoid)", total);
    return 0;
}

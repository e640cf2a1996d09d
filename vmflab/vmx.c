/*
 * vmx: the lab's stand-in for ESXi's /bin/vmx, one process per running VM.
 *
 * It accepts any arguments and pauses forever, or with VMFLAB_BUSY=1 spins on a CPU forever
 * (a loaded guest, for benchmarks under load; still killed by any fatal signal).
 * Started by the lab's vmflab-vm shim:
 *   stage 1 (argv[0] is not "/bin/vmx"): leave the session, record the VM's run file
 *           (world ID and identity keyed by this PID, which is the VM's cartel ID), then
 *           re-exec itself as "/bin/vmx ..." so the process table shows the ESXi command line.
 *           The run file is written first so that whoever sees a "/bin/vmx" process can
 *           always find its world ID.
 *   stage 2 (argv[0] is "/bin/vmx"): point stdio at /dev/null, which closes the readiness
 *           pipe the shim waits on, and pause (or spin).
 *
 * Environment for stage 1 (all optional): VMFLAB_RUNDIR, VMFLAB_WORLD_OFFSET, VMFLAB_INFO,
 * VMFLAB_BUSY (stage 1 passes it on to stage 2 only when it is exactly "1").
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define VMX_ARGV0 "/bin/vmx"
#define BUSY_VAR "VMFLAB_BUSY"

/* volatile: the compiler must keep the busy loop's work, not fold it into an idle spin. */
static volatile unsigned long spins;

static int write_run_file(void)
{
	const char *dir = getenv("VMFLAB_RUNDIR");
	const char *info = getenv("VMFLAB_INFO");
	const char *offset_text = getenv("VMFLAB_WORLD_OFFSET");
	char path[4096], tmp[4096];
	long offset = 1;
	pid_t pid = getpid();
	FILE *f;

	if (dir == NULL || info == NULL)
		return 0;
	if (offset_text != NULL) {
		char *end;
		offset = strtol(offset_text, &end, 10);
		if (*offset_text == '\0' || *end != '\0')
			return -1;
	}
	if (snprintf(path, sizeof path, "%s/vm.%d", dir, (int)pid) >= (int)sizeof path ||
	    snprintf(tmp, sizeof tmp, "%s/.vm.%d.tmp", dir, (int)pid) >= (int)sizeof tmp)
		return -1;
	f = fopen(tmp, "w");
	if (f == NULL)
		return -1;
	fprintf(f, "%ld\t%s\n", (long)pid + offset, info);
	if (fclose(f) != 0)
		return -1;
	return rename(tmp, path);
}

int main(int argc, char **argv)
{
	int null_fd;
	int busy;
	const char *busy_text;

	(void)argc;
	if (argv[0] == NULL || strcmp(argv[0], VMX_ARGV0) != 0) {
		/* A VM outlives the ssh session that started it. */
		(void)setsid();
		if (write_run_file() != 0)
			return 70;
		unsetenv("VMFLAB_RUNDIR");
		unsetenv("VMFLAB_INFO");
		unsetenv("VMFLAB_WORLD_OFFSET");
		busy_text = getenv(BUSY_VAR);
		if (busy_text != NULL && strcmp(busy_text, "1") != 0)
			unsetenv(BUSY_VAR);
		argv[0] = VMX_ARGV0;
		execv("/proc/self/exe", argv);
		return 71;
	}
	busy_text = getenv(BUSY_VAR);
	busy = busy_text != NULL && strcmp(busy_text, "1") == 0;
	unsetenv(BUSY_VAR);
	(void)prctl(PR_SET_NAME, "vmx", 0, 0, 0);
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	null_fd = open("/dev/null", O_RDWR);
	if (null_fd < 0)
		return 72;
	dup2(null_fd, 0);
	dup2(null_fd, 1);
	dup2(null_fd, 2);
	if (null_fd > 2)
		close(null_fd);
	if (busy)
		for (;;)
			spins++;
	for (;;)
		pause();
}

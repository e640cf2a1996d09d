/*
 * worlds: the lab's stand-in for ESXi's native world listers, one binary called by two names
 * (as busybox applets are):
 *   ps [-c]       busybox ps: worlds with their cartel IDs (columns WID CID World Name
 *                 [Command]); a VM's cartel shows its vmx, vthread and vcpu worlds
 *   vmdumper -l   one line per running VM
 *
 * On ESXi both are native programs that answer in milliseconds. The sh+awk version of the lab
 * (procps ps piped into awk) cost about 8 ms here, mostly three process start-ups, which made
 * the lab slower than the host it stands for on the fence path. The output is what
 * vmflab.awk prints for the same modes (the esxcli modes stay there: esxcli is slow anyway).
 *
 * A VM is a live (not zombie) process named "vmx" whose command line is
 * "/bin/vmx ... /vmfs/...vmx". Its world ID and identity come from its run file
 * (/vmfs/.lab/run/vm.<cartel>: "world<TAB>uuid<TAB>name<TAB>cfg"), else from its .vmx.
 * The name stays |XX-escaped as the .vmx writes it until printed: vmdumper prints it decoded,
 * whatever it holds (the lab's hostile names); ps shows a control character as "?", as
 * busybox ps does.
 */
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RUN_DIR "/vmfs/.lab/run"
#define BIG 65536
#define NAME 4096

enum mode { MODE_PS, MODE_PSC, MODE_VMDUMPER };

struct proc {
	char state;
	char comm[64];
	char args[BIG];
};

static int read_file(const char *path, char *buf, size_t size, size_t *len)
{
	FILE *f = fopen(path, "r");
	size_t n;

	if (f == NULL)
		return -1;
	n = fread(buf, 1, size - 1, f);
	fclose(f);
	buf[n] = '\0';
	*len = n;
	return 0;
}

/* comm and state from /proc/PID/stat; the command line with NULs as spaces, or "[comm]". */
static int read_proc(const char *pid, struct proc *p)
{
	char path[64], stat[1024];
	size_t len, i;
	char *open, *close;

	snprintf(path, sizeof path, "/proc/%s/stat", pid);
	if (read_file(path, stat, sizeof stat, &len) < 0)
		return -1;
	open = strchr(stat, '(');
	close = strrchr(stat, ')');
	if (open == NULL || close == NULL || close < open || close[1] != ' ')
		return -1;
	len = (size_t)(close - open - 1);
	if (len >= sizeof p->comm)
		len = sizeof p->comm - 1;
	memcpy(p->comm, open + 1, len);
	p->comm[len] = '\0';
	p->state = close[2];
	snprintf(path, sizeof path, "/proc/%s/cmdline", pid);
	if (read_file(path, p->args, sizeof p->args, &len) < 0)
		return -1;
	while (len > 0 && p->args[len - 1] == '\0')
		len--;
	p->args[len] = '\0';
	for (i = 0; i < len; i++)
		if (p->args[i] == '\0')
			p->args[i] = ' ';
	if (len == 0)
		snprintf(p->args, sizeof p->args, "[%s]", p->comm);
	return 0;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);

	return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* The value of a .vmx line 'key = "value"', as vmflab.awk's vmx_value reads it. */
static void vmx_value(const char *line, char *out, size_t size)
{
	const char *v = strchr(line, '=');
	size_t n;

	out[0] = '\0';
	if (v == NULL)
		return;
	v++;
	while (*v == ' ' || *v == '\t')
		v++;
	if (*v == '"')
		v++;
	n = strlen(v);
	while (n > 0 && (v[n - 1] == '\n' || v[n - 1] == ' ' || v[n - 1] == '\t'))
		n--;
	if (n > 0 && v[n - 1] == '"')
		n--;
	if (n >= size)
		n = size - 1;
	memcpy(out, v, n);
	out[n] = '\0';
}

static int is_key(const char *line, const char *key)
{
	size_t n = strlen(key);

	while (*line == ' ' || *line == '\t')
		line++;
	if (strncmp(line, key, n) != 0)
		return 0;
	line += n;
	while (*line == ' ' || *line == '\t')
		line++;
	return *line == '=';
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* The .vmx value encoding, as vmflab.awk's vmx_decode: |XX is the byte of hex XX (never NUL).
 * ps_form: control characters shown as "?". */
static void vmx_decode(const char *in, char *out, size_t size, int ps_form)
{
	size_t n = 0;
	int hi, lo;
	unsigned char c;

	while (*in != '\0' && n + 1 < size) {
		c = (unsigned char)*in;
		if (c == '|' && (hi = hex_digit(in[1])) >= 0 && (lo = hex_digit(in[2])) >= 0 &&
		    hi * 16 + lo != 0) {
			c = (unsigned char)(hi * 16 + lo);
			in += 3;
		} else {
			in++;
		}
		if (ps_form && (c < 32 || c == 127))
			c = '?';
		out[n++] = (char)c;
	}
	out[n] = '\0';
}

static void from_vmx(const char *cfg, char *name, char *uuid)
{
	char line[4 * NAME];
	FILE *f = fopen(cfg, "r");

	if (f == NULL)
		return;
	while (fgets(line, sizeof line, f) != NULL) {
		if (is_key(line, "displayName"))
			vmx_value(line, name, NAME);
		else if (is_key(line, "uuid.bios"))
			vmx_value(line, uuid, 256);
	}
	fclose(f);
}

/* world, uuid and name from the run file when it names this cfg; false otherwise. */
static int from_run_file(const char *pid, const char *cfg, long *world, char *name, char *uuid)
{
	char path[256], rec[BIG], *f[4], *end, *s;
	size_t len;
	int i;

	snprintf(path, sizeof path, "%s/vm.%s", RUN_DIR, pid);
	if (read_file(path, rec, sizeof rec, &len) < 0)
		return 0;
	rec[strcspn(rec, "\n")] = '\0';
	s = rec;
	for (i = 0; i < 4; i++) {
		f[i] = s;
		s = strchr(s, '\t');
		if (s == NULL && i < 3)
			return 0;
		if (s != NULL)
			*s++ = '\0';
	}
	if (strcmp(f[3], cfg) != 0 || f[0][0] == '\0')
		return 0;
	*world = strtol(f[0], &end, 10);
	if (*end != '\0')
		return 0;
	snprintf(uuid, 256, "%s", f[1]);
	snprintf(name, NAME, "%s", f[2]);
	return 1;
}

static void world_line(enum mode mode, long wid, const char *cid, const char *name,
		       const char *args)
{
	if (mode == MODE_PSC)
		printf("%-10ld %-10s %-36s %s\n", wid, cid, name, args);
	else
		printf("%-10ld %-10s %s\n", wid, cid, name);
}

static void report(enum mode mode, const char *pid, const struct proc *p)
{
	char name[NAME] = "", uuid[256] = "", shown[NAME], vcpu[NAME + 16];
	const char *cfg = NULL, *slash;
	long world = atol(pid) + 1;

	if (strcmp(p->comm, "vmx") == 0 && strncmp(p->args, "/bin/vmx ", 9) == 0 &&
	    ends_with(p->args, ".vmx")) {
		cfg = strstr(p->args, " /vmfs/");
		if (cfg != NULL)
			cfg++;
	}
	if (cfg == NULL) {
		if (mode != MODE_VMDUMPER)
			world_line(mode, atol(pid), pid, p->comm, p->args);
		return;
	}
	if (!from_run_file(pid, cfg, &world, name, uuid) || name[0] == '\0')
		from_vmx(cfg, name, uuid);
	if (name[0] == '\0') {
		slash = strrchr(cfg, '/');
		snprintf(name, sizeof name, "%s", slash ? slash + 1 : cfg);
		name[strlen(name) - (ends_with(name, ".vmx") ? 4 : 0)] = '\0';
	}
	if (mode == MODE_VMDUMPER) {
		vmx_decode(name, shown, sizeof shown, 0);
		printf("vmid=%ld pid=-1 cfgFile=\"%s\" uuid=\"%s\" displayName=\"%s\" "
		       "vmxCartelID=%s\n",
		       world, cfg, uuid, shown, pid);
		return;
	}
	vmx_decode(name, shown, sizeof shown, 1);
	snprintf(vcpu, sizeof vcpu, "vmx-vcpu-0:%s", shown);
	world_line(mode, atol(pid), pid, "vmx", p->args);
	world_line(mode, world + 1, pid, "vmx-vthread-1", p->args);
	world_line(mode, world + 2, pid, "vmx-vthread-2", p->args);
	world_line(mode, world, pid, vcpu, p->args);
}

static int all_digits(const char *s)
{
	if (*s == '\0')
		return 0;
	for (; *s; s++)
		if (!isdigit((unsigned char)*s))
			return 0;
	return 1;
}

int main(int argc, char **argv)
{
	const char *self = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
	static struct proc p;
	enum mode mode;
	struct dirent *entry;
	DIR *proc;

	if (strcmp(self, "vmdumper") == 0) {
		if (argc != 2 || strcmp(argv[1], "-l") != 0) {
			fprintf(stderr, "usage: vmdumper -l   (the lab's vmdumper knows only -l)\n");
			return 1;
		}
		mode = MODE_VMDUMPER;
	} else if (argc == 1) {
		mode = MODE_PS;
	} else if (argc == 2 && strcmp(argv[1], "-c") == 0) {
		mode = MODE_PSC;
	} else {
		fprintf(stderr, "ps: unsupported option(s):");
		for (int i = 1; i < argc; i++)
			fprintf(stderr, " %s", argv[i]);
		fprintf(stderr, " (the lab's ps knows \"ps\" and \"ps -c\"; use /bin/ps)\n");
		return 1;
	}
	proc = opendir("/proc");
	if (proc == NULL) {
		perror("ps: /proc");
		return 1;
	}
	if (mode == MODE_PSC)
		printf("%-10s %-10s %-36s %s\n", "WID", "CID", "World Name", "Command");
	else if (mode == MODE_PS)
		printf("%-10s %-10s %s\n", "WID", "CID", "World Name");
	/* /proc lists PIDs in ascending order, as ps -e does. */
	while ((entry = readdir(proc)) != NULL) {
		if (!all_digits(entry->d_name))
			continue;
		/* Gone meanwhile, or a zombie: ps shows neither as a world. */
		if (read_proc(entry->d_name, &p) < 0 || p.state == 'Z')
			continue;
		report(mode, entry->d_name, &p);
	}
	closedir(proc);
	return fflush(stdout) == 0 ? 0 : 1;
}

/* The lab's /usr/bin/kvm on a Proxmox node: a process that holds Proxmox's exact kvm command
 * line (with Proxmox's own -id option, which upstream qemu refuses) and does what qemu does
 * with the parts the host sees:
 *   -chardev socket,id=qmp,path=P,server=on,...  listens on the unix socket P (no QMP spoken);
 *   -pidfile F   writes "PID\n" to F (as qemu_write_pidfile), after daemonizing;
 *   -daemonize   forks, the child runs in a session of its own, the parent exits 0 once the
 *                child has written the pid file (qemu's parent also waits for the child).
 * Its comm is "kvm" (the name it was started as). SIGTERM ends it, like qemu. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static const char *qmp_path(const char *spec) {
    if (strncmp(spec, "socket,id=qmp,", 14) != 0) return NULL;
    const char *p = strstr(spec, "path=");
    return p ? p + 5 : NULL;
}

static int listen_unix(const char *spec) {
    char path[108];
    size_t n = strcspn(spec, ",");
    if (n >= sizeof path) return -1;
    memcpy(path, spec, n);
    path[n] = 0;
    unlink(path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 1)) return -1;
    return fd;
}

int main(int argc, char **argv) {
    const char *pidfile = NULL, *qmp = NULL;
    int daemonize = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-pidfile") && i + 1 < argc) pidfile = argv[++i];
        else if (!strcmp(argv[i], "-daemonize")) daemonize = 1;
        else if (!strcmp(argv[i], "-chardev") && i + 1 < argc && qmp_path(argv[i + 1]))
            qmp = qmp_path(argv[++i]);
    }
    if (qmp && listen_unix(qmp) < 0) {
        fprintf(stderr, "kvm: -chardev: cannot listen on the QMP socket\n");
        return 1;
    }
    int ready[2];
    if (pipe(ready)) return 1;
    if (daemonize) {
        pid_t child = fork();
        if (child < 0) return 1;
        if (child > 0) {
            char c;
            close(ready[1]);
            return read(ready[0], &c, 1) == 1 ? 0 : 1;
        }
        setsid();
    }
    close(ready[0]);
    if (pidfile) {
        char text[32];
        int fd = open(pidfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        int len = snprintf(text, sizeof text, "%d\n", (int)getpid());
        if (fd < 0 || write(fd, text, len) != len) {
            fprintf(stderr, "kvm: cannot write pid file %s\n", pidfile);
            return 1;
        }
        close(fd);
    }
    int null = open("/dev/null", O_RDWR);
    if (daemonize && null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
    }
    if (write(ready[1], "r", 1) != 1 && daemonize) return 1;
    close(ready[1]);
    for (;;) pause();
}

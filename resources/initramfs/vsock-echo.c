/* vsock-echo: a tiny AF_VSOCK tool for ligera's Linux vsock tests (static,
 * in the busybox initramfs as /bin/vsock-echo).
 *
 *   vsock-echo PORT          listen on PORT, accept one connection, send back
 *                            every byte until the peer shuts its side; exit 0
 *   vsock-echo -c PORT TEXT  connect to the host (CID 2) port PORT, send TEXT,
 *                            shut down writing, print "vsock-echo: got <reply>"
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	fprintf(stderr, "vsock-echo: %s: %s\n", what, strerror(errno));
	return 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int serve(unsigned port)
{
	int l = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (l < 0)
		return fail("socket");
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	if (bind(l, (struct sockaddr *)&addr, sizeof(addr)) || listen(l, 1))
		return fail("bind/listen");
	printf("vsock-echo: listening on port %u\n", port);
	fflush(stdout);
	int c = accept(l, NULL, NULL);
	if (c < 0)
		return fail("accept");
	char buf[4096];
	size_t total = 0;
	for (;;) {
		ssize_t n = read(c, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail("read");
		if (n == 0)
			break;
		if (write_all(c, buf, (size_t)n))
			return fail("write");
		total += (size_t)n;
	}
	printf("vsock-echo: echoed %zu bytes\n", total);
	close(c);
	close(l);
	return 0;
}

static int client(unsigned port, const char *text)
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		return fail("socket");
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
	if (connect(s, (struct sockaddr *)&addr, sizeof(addr)))
		return fail("connect");
	if (write_all(s, text, strlen(text)) || shutdown(s, SHUT_WR))
		return fail("write");
	char reply[4096];
	size_t got = 0;
	for (;;) {
		ssize_t n = read(s, reply + got, sizeof(reply) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail("read");
		if (n == 0 || got + (size_t)n == sizeof(reply) - 1) {
			got += (size_t)(n > 0 ? n : 0);
			break;
		}
		got += (size_t)n;
	}
	reply[got] = 0;
	printf("vsock-echo: got %s\n", reply);
	close(s);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 2)
		return serve((unsigned)strtoul(argv[1], NULL, 10));
	if (argc == 4 && strcmp(argv[1], "-c") == 0)
		return client((unsigned)strtoul(argv[2], NULL, 10), argv[3]);
	fprintf(stderr, "usage: vsock-echo PORT | vsock-echo -c PORT TEXT\n");
	return 2;
}

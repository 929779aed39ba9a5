/* A guest agent taken over: booted as init in place of ligera-agent, it
 * accepts ligera's connection on vsock port 1024 and answers with garbage
 * (a frame header claiming a 4 GiB payload, then junk), then keeps the
 * connection open and never says anything sensible. ligera must end the run
 * with a clear error (status 125), not hang, panic or allocate 4 GiB. */
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

int main(void)
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof(addr));
	addr.svm_family = AF_VSOCK;
	addr.svm_port = 1024;
	addr.svm_cid = VMADDR_CID_ANY;
	if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof(addr)) || listen(s, 4))
		for (;;)
			pause();
	for (;;) {
		int c = accept(s, 0, 0);
		if (c < 0)
			continue;
		static unsigned char junk[65536];
		memset(junk, 0xff, sizeof(junk));
		junk[4] = 5; /* a Stdout frame of 0xffffffff bytes */
		if (write(c, junk, sizeof(junk)) < 0)
			close(c);
	}
}

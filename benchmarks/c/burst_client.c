/* burst_client PORT N IN_FLIGHT: open N TCP connections to 127.0.0.1:PORT, at
 * most IN_FLIGHT connecting or awaiting their echo at once; each sends one byte
 * and waits for it to come back. Prints {"open_s": S, "opened": K} once all
 * are echoed (or after 60 s), then holds every connection open until stdin
 * closes. Used by benchmarks/burst.py so that the load generator costs the two
 * cores almost nothing (a Python client competes with the code under test). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT N IN_FLIGHT\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), n = atoi(argv[2]), in_flight = atoi(argv[3]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    int ep = epoll_create1(0);
    int *fds = calloc(n, sizeof(int));
    int started = 0, done = 0, active = 0;
    struct epoll_event events[256];
    double t0 = now(), deadline = t0 + 60.0;
    while (done < n && now() < deadline) {
        while (active < in_flight && started < n) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (fd < 0) { perror("socket"); return 1; }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
                perror("connect");
                return 1;
            }
            fds[started] = fd;
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (unsigned)started};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            started++;
            active++;
        }
        int k = epoll_wait(ep, events, 256, 100);
        for (int i = 0; i < k; i++) {
            int idx = (int)events[i].data.u32, fd = fds[idx];
            if (events[i].events & (EPOLLERR | EPOLLHUP)) {
                fprintf(stderr, "connection %d failed\n", idx);
                return 1;
            }
            if (events[i].events & EPOLLOUT) {
                if (write(fd, "x", 1) != 1) { perror("write"); return 1; }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)idx};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            } else if (events[i].events & EPOLLIN) {
                char c;
                ssize_t r = read(fd, &c, 1);
                if (r != 1 || c != 'x') {
                    fprintf(stderr, "connection %d: no echo\n", idx);
                    return 1;
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                done++;
                active--;
            }
        }
    }
    printf("{\"open_s\": %.6f, \"opened\": %d}\n", now() - t0, done);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    for (int i = 0; i < started; i++) close(fds[i]);
    return 0;
}

#!/usr/bin/env python3
"""What `cairn serve` costs a run: the same backup (3 nodes, half random, half
text) run by the CLI in its own process and through a server (`cairn --server URL
plan start`, which follows the run by polling), alternating, in one run; and the
server's peak RSS after all of it, and while 200 clients hold event streams open.

    python3 benches/serve_overhead.py [--mib 64] [--reps 5] [--out bench-out-serve]

Reports medians of wall time (MiB/s of data) for each way and their ratio."""
import argparse, os, shutil, signal, statistics, subprocess, sys, time, urllib.request, socket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, generate, run  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64, help="data per node")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-serve"))
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    nodes = []
    for i in range(3):
        d = os.path.join(a.out, f"node-{i}")
        generate(d, a.mib)
        nodes.append(d)
    cluster = os.path.join(a.out, "cluster.toml")
    with open(cluster, "w") as f:
        f.write('name = "bench"\n')
        for i, d in enumerate(nodes):
            f.write(f'[[nodes]]\nindex = {i}\ndata_dir = "{d}"\n')
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"))
    srv = subprocess.Popen(
        [cairn, "serve", "--listen", "127.0.0.1:0", "--cluster", cluster, "--store", "store"],
        cwd=a.out, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = srv.stdout.readline().strip().rsplit(" ", 1)[-1]
    total_mib = 3 * a.mib
    local, remote = [], []
    try:
        for r in range(a.reps):
            common = ["plan", "start", "backup-local", "-q", "-p", "BACKUP_DIR=store", "-p", "STRATEGY=parallel"]
            t = run([cairn] + common + ["--cluster", cluster, "-p", f"SNAPSHOT_NAME=l{r}"], cwd=a.out, env=env)
            local.append(t["secs"])
            t = run([cairn, "--server", url] + common + ["-p", f"SNAPSHOT_NAME=r{r}"], cwd=a.out, env=env)
            remote.append(t["secs"])
        after_runs = rss_kib(srv.pid)
        # 200 idle event streams.
        host, port = url.split("//")[1].split(":")
        socks = []
        for _ in range(200):
            s = socket.create_connection((host, int(port)))
            s.sendall(f"GET /v1/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            socks.append(s)
        time.sleep(1)
        t = run([cairn, "--server", url, "plan", "start", "backup-local", "-q", "-p", "BACKUP_DIR=store",
                 "-p", "STRATEGY=parallel", "-p", "SNAPSHOT_NAME=with-streams"], cwd=a.out, env=env)
        with_streams = t["secs"]
        with urllib.request.urlopen(url + "/metrics") as m:
            m.read()
        peak = rss_kib(srv.pid)
        for s in socks:
            s.close()
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=60)
    ml, mr = statistics.median(local), statistics.median(remote)
    print(f"data: 3 nodes x {a.mib} MiB = {total_mib} MiB, {a.reps} runs each, alternating")
    print(f"local CLI run      median {ml:.2f} s  {total_mib / ml:.0f} MiB/s")
    print(f"through the server median {mr:.2f} s  {total_mib / mr:.0f} MiB/s  ratio {mr / ml:.2f}x")
    print(f"through the server with 200 open event streams: {with_streams:.2f} s ({with_streams / ml:.2f}x the local median)")
    print(f"server peak RSS: {after_runs / 1024:.0f} MiB after {2 * a.reps} runs, {peak / 1024:.0f} MiB with 200 streams")


if __name__ == "__main__":
    main()

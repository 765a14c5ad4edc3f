#!/usr/bin/env python3
"""End-to-end comparison in one run on the same data, against s3s-fs and Azurite on loopback:

  cairn backup-s3 (serial and parallel), cairn restore-s3 (serial and parallel)
  tar czf - DIR | aws s3 cp - s3://...            per node, one after the other
  tar cf - DIR | pigz | aws s3 cp - s3://...       per node
  aws s3 cp FILE s3://...                          plain upload of cairn's own objects
  cairn backup-s3 and restore-s3 parallel, nodes reached over ssh (a private sshd on loopback): the
  agents stream each node to the store; the coordinator's peak RSS stays flat
                                                   (the same bytes: the server's ceiling)
  cairn backup-azure / restore-azure, and a plain block upload of cairn's objects by
  the same client (benches/put_object.rs), against Azurite on disk

    eval "$(scripts/install-test-servers)"; python3 benches/s3_compare.py [--nodes 3] [--mib 256] [--reps 1]

Data: N nodes x MIB MiB, half incompressible, half text. Throughput is MiB of
uncompressed node data per second; peak RSS is the largest process of each command."""
import argparse, json, os, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AK, SK, ROOT, generate, run, start_s3s  # noqa: E402



def start_azurite(data):
    exe = os.environ.get("CAIRN_TEST_AZURITE") or os.path.join(ROOT, ".tools/azurite/node_modules/.bin/azurite-blob")
    os.makedirs(data, exist_ok=True)
    p = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", data, "--silent",
                          "--disableTelemetry", "--skipApiVersionCheck"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = p.stdout.readline()
        if "successfully listens on" in line:
            return p, line[line.index("http://"):].split()[0].rstrip("/") + "/devstoreaccount1"
    p.kill()
    sys.exit("azurite did not start")


AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def start_sshd(d):
    """A private sshd on loopback with its own keys; returns (process, client config)."""
    sshd = os.environ.get("CAIRN_TEST_SSHD") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        return None, None
    os.makedirs(d, exist_ok=True)
    for k in ["hostkey", "userkey"]:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/{k}"], check=True)
    shutil.copy(f"{d}/userkey.pub", f"{d}/authorized_keys")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with open(f"{d}/sshd_config", "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n"
                "PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
                f"PidFile {d}/sshd.pid\nMaxStartups 100\n")
    user = os.environ.get("USER", "root")
    with open(f"{d}/ssh_config", "w") as f:
        f.write(f"Host node*\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {d}/userkey\n"
                "  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    os.makedirs("/run/sshd", exist_ok=True)
    p = subprocess.Popen([sshd, "-D", "-e", "-f", f"{d}/sshd_config"], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return p, f"{d}/ssh_config"
        except OSError:
            time.sleep(0.05)
    p.kill()
    return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-s3"))
    ap.add_argument("--skip-s3", action="store_true", help="only the Azure part")
    a = ap.parse_args()
    aws = os.environ.get("CAIRN_TEST_AWS_CLI") or os.path.join(ROOT, ".tools/venv/bin/aws")
    if not shutil.which("pigz"):
        subprocess.run(["apt-get", "install", "-y", "-q", "pigz"], check=False, capture_output=True)
    pigz = shutil.which("pigz")
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    nodes = []
    for i in range(a.nodes):
        d = os.path.join(a.out, f"src/node-{i}")
        generate(d, a.mib)
        nodes.append(d)
    data = sum(os.path.getsize(os.path.join(d, f)) for n in nodes for d, _, fs in os.walk(n) for f in fs)
    mib = data / (1 << 20)
    with open(os.path.join(a.out, "src.toml"), "w") as f:
        f.write('name = "bench"\n' + "".join(f'[[nodes]]\nindex = {i}\ndata_dir = "{d}"\n' for i, d in enumerate(nodes)))
    tgt = os.path.join(a.out, "tgt")
    with open(os.path.join(a.out, "tgt.toml"), "w") as f:
        f.write('name = "t"\n' + "".join(f'[[nodes]]\nindex = {i}\ndata_dir = "{tgt}/node-{i}"\n' for i in range(a.nodes)))
    sshd, ssh_cfg = start_sshd(os.path.join(a.out, "sshd"))
    if ssh_cfg:
        with open(os.path.join(a.out, "src-ssh.toml"), "w") as f:
            f.write(f'name = "bench"\nagent_path = "{cairn}"\n' + "".join(
                f'[[nodes]]\nindex = {i}\ndata_dir = "{d}"\nexec = ["ssh", "-F", "{ssh_cfg}", "node{i}", "--"]\n'
                for i, d in enumerate(nodes)))
    server, url = start_s3s(os.path.join(a.out, "s3data"))
    env = dict(os.environ, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", CAIRN_HOME=os.path.join(a.out, "home"))
    s3 = [aws, "--endpoint-url", url, "s3"]
    subprocess.run([aws, "--endpoint-url", url, "s3api", "create-bucket", "--bucket", "bench"], env=env, check=True, capture_output=True)
    common = ["-p", "AWS_REGION=us-east-1", "-p", "S3_BUCKET_NAME=bench", "-p", f"S3_ENDPOINT_URL={url}"]
    results = {}
    sizes = {}

    def rec(name, r):
        results.setdefault(name, []).append(r)

    try:
        for rep in range(0 if a.skip_s3 else a.reps):
            for strategy in ["serial", "parallel"]:
                snap = f"{strategy}-{rep}"
                r = run([cairn, "-q", "plan", "start", "backup-s3", "--cluster", os.path.join(a.out, "src.toml"),
                         "-p", f"SNAPSHOT_NAME={snap}", "-p", f"STRATEGY={strategy}", "-p", f"MAX_CONCURRENCY={a.nodes}"] + common, env=env)
                rec(f"cairn backup-s3 {strategy}", r)
                tgt = os.path.join(a.out, "tgt")
                with open(os.path.join(a.out, "tgt.toml"), "w") as f:
                    f.write('name = "t"\n' + "".join(f'[[nodes]]\nindex = {i}\ndata_dir = "{tgt}/node-{i}"\n' for i in range(a.nodes)))
                r = run([cairn, "-q", "plan", "start", "restore-s3", "--cluster", os.path.join(a.out, "tgt.toml"),
                         "-p", f"SNAPSHOT_NAME={snap}", "-p", f"STRATEGY={strategy}", "-p", f"MAX_CONCURRENCY={a.nodes}"] + common, env=env)
                rec(f"cairn restore-s3 {strategy}", r)
                shutil.rmtree(tgt)
            if ssh_cfg:
                r = run([cairn, "-q", "plan", "start", "backup-s3", "--cluster", os.path.join(a.out, "src-ssh.toml"),
                         "-p", f"SNAPSHOT_NAME=ssh-{rep}", "-p", "STRATEGY=parallel", "-p", f"MAX_CONCURRENCY={a.nodes}"] + common, env=env)
                rec("cairn backup-s3 parallel, ssh", r)
                tgt = os.path.join(a.out, "tgt")
                with open(os.path.join(a.out, "tgt-ssh.toml"), "w") as f:
                    f.write(f'name = "t"\nagent_path = "{cairn}"\n' + "".join(
                        f'[[nodes]]\nindex = {i}\ndata_dir = "{tgt}/node-{i}"\nexec = ["ssh", "-F", "{ssh_cfg}", "node{i}", "--"]\n'
                        for i in range(a.nodes)))
                r = run([cairn, "-q", "plan", "start", "restore-s3", "--cluster", os.path.join(a.out, "tgt-ssh.toml"),
                         "-p", f"SNAPSHOT_NAME=ssh-{rep}", "-p", "STRATEGY=parallel", "-p", f"MAX_CONCURRENCY={a.nodes}"] + common, env=env)
                rec("cairn restore-s3 parallel, ssh", r)
                shutil.rmtree(tgt)
            # cairn's objects, for sizes and the plain-upload baseline
            objs = os.path.join(a.out, "objs")
            shutil.rmtree(objs, ignore_errors=True)
            subprocess.run(s3 + ["cp", "--recursive", "--quiet", f"s3://bench/serial-{rep}/", objs], env=env, check=True)
            sizes["cairn"] = sum(os.path.getsize(os.path.join(objs, f"node-{i}.tar.gz")) for i in range(a.nodes))
            plain = " && ".join(f"{' '.join(s3)} cp --quiet {objs}/node-{i}.tar.gz s3://bench/plain-{rep}/node-{i}.tar.gz" for i in range(a.nodes))
            rec("aws s3 cp (cairn's objects)", run(["sh", "-c", plain], env=env))
            pipe = " && ".join(f"tar czf - -C {n} app | {' '.join(s3)} cp --quiet - s3://bench/tgz-{rep}/node-{i}.tar.gz" for i, n in enumerate(nodes))
            rec("tar czf | aws s3 cp", run(["sh", "-c", pipe], env=env))
            tmp = os.path.join(a.out, "x.tgz")
            subprocess.run(["sh", "-c", f"tar czf - -C {nodes[0]} app > {tmp}"], check=True)
            sizes["gzip -6"] = os.path.getsize(tmp) * a.nodes
            os.remove(tmp)
            if pigz:
                pipe = " && ".join(f"tar cf - -C {n} app | pigz | {' '.join(s3)} cp --quiet - s3://bench/pigz-{rep}/node-{i}.tar.gz" for i, n in enumerate(nodes))
                rec("tar | pigz | aws s3 cp", run(["sh", "-c", pipe], env=env))
    finally:
        server.kill()
        server.wait()
        if sshd:
            sshd.kill()
            sshd.wait()

    # Azure Blob storage (Azurite, on disk): cairn, and a plain block upload of cairn's
    # own objects by the same client (benches/put_object.rs).
    built = subprocess.run(["cargo", "bench", "--locked", "--bench", "put_object", "--no-run", "--message-format=json"],
                           cwd=ROOT, check=True, capture_output=True, text=True).stdout
    exe = [m["executable"] for m in map(json.loads, built.splitlines())
           if m.get("executable") and m.get("target", {}).get("name") == "put_object"][-1]
    put = [exe]
    az, az_url = start_azurite(os.path.join(a.out, "azdata"))
    azenv = dict(env, AZURE_STORAGE_ACCOUNT="devstoreaccount1", AZURE_STORAGE_KEY=AZ_KEY, AZURE_ENDPOINT_URL=az_url)
    try:
        subprocess.run(put + ["create-container", "bench"], cwd=ROOT, env=azenv, check=True)
        azp = ["-p", "AZURE_STORAGE_ACCOUNT=devstoreaccount1", "-p", "CONTAINER_NAME=bench", "-p", f"AZURE_ENDPOINT_URL={az_url}"]
        for rep in range(a.reps):
            for strategy in ["serial", "parallel"]:
                snap = f"az-{strategy}-{rep}"
                r = run([cairn, "-q", "plan", "start", "backup-azure", "--cluster", os.path.join(a.out, "src.toml"),
                         "-p", f"SNAPSHOT_NAME={snap}", "-p", f"STRATEGY={strategy}", "-p", f"MAX_CONCURRENCY={a.nodes}"] + azp, env=azenv)
                rec(f"cairn backup-azure {strategy}", r)
                tgt = os.path.join(a.out, "tgt")
                r = run([cairn, "-q", "plan", "start", "restore-azure", "--cluster", os.path.join(a.out, "tgt.toml"),
                         "-p", f"SNAPSHOT_NAME={snap}", "-p", f"STRATEGY={strategy}", "-p", f"MAX_CONCURRENCY={a.nodes}"] + azp, env=azenv)
                rec(f"cairn restore-azure {strategy}", r)
                shutil.rmtree(tgt)
            objs = os.path.join(a.out, "objs")
            if not os.path.exists(objs):
                # cairn's objects are deterministic: a local backup gives the same bytes.
                subprocess.run([cairn, "-q", "plan", "start", "backup-local", "--cluster", os.path.join(a.out, "src.toml"),
                                "-p", f"SNAPSHOT_NAME=objs-{rep}", "-p", f"BACKUP_DIR={a.out}/local"], env=env, check=True)
                shutil.copytree(f"{a.out}/local/objs-{rep}", objs)
            plain = " && ".join(f"{' '.join(put)} az://bench plain-{rep}/node-{i}.tar.gz {objs}/node-{i}.tar.gz"
                                for i in range(a.nodes))
            rec("plain block upload (cairn's objects)", run(["sh", "-c", plain], env=azenv))
    finally:
        az.kill()
        az.wait()

    print(f"data: {a.nodes} nodes x {a.mib} MiB = {mib:.0f} MiB (half random, half text); s3s-fs on loopback; "
          f"{a.reps} run(s) each, medians\n")
    print(f"{'command':32} {'MiB/s':>8} {'peak RSS':>10}")
    summary = {}
    for name, rs in results.items():
        secs = statistics.median(r["secs"] for r in rs)
        rss = max(r["rss_kib"] for r in rs) / 1024
        summary[name] = mib / secs
        print(f"{name:32} {mib / secs:8.1f} {rss:8.1f} MiB")
    print()
    if "cairn backup-s3 parallel, ssh" in summary:
        print("cairn backup-s3 parallel, ssh / local: "
              f"{summary['cairn backup-s3 parallel, ssh'] / summary['cairn backup-s3 parallel']:.2f} "
              "(peak RSS over ssh is the coordinator's; locally it is the process doing the work)")
    if "cairn restore-s3 parallel, ssh" in summary:
        print("cairn restore-s3 parallel, ssh / local: "
              f"{summary['cairn restore-s3 parallel, ssh'] / summary['cairn restore-s3 parallel']:.2f}")
    for c in ["cairn backup-s3 serial", "cairn backup-s3 parallel"]:
        for other in ["tar czf | aws s3 cp", "tar | pigz | aws s3 cp", "aws s3 cp (cairn's objects)"]:
            if other in summary:
                print(f"{c} / {other}: {summary[c] / summary[other]:.2f}")
    for c in ["cairn backup-azure serial", "cairn backup-azure parallel"]:
        other = "plain block upload (cairn's objects)"
        if c in summary and other in summary:
            print(f"{c} / {other}: {summary[c] / summary[other]:.2f}")
    if "cairn" in sizes:
        print(f"\ncompressed: cairn {sizes['cairn'] / (1 << 20):.1f} MiB, gzip -6 {sizes['gzip -6'] / (1 << 20):.1f} MiB, "
          f"ratio {sizes['cairn'] / sizes['gzip -6']:.3f}")


if __name__ == "__main__":
    main()

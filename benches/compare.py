#!/usr/bin/env python3
"""End-to-end comparison, one run, same data: cairn backup-local / restore-local
versus `tar czf` (and `tar xzf`) on a generated node; with `age` installed, also
cairn with client-side encryption (ENCRYPT_TO / AGE_IDENTITY) versus
`tar cz | age -R` (and `age -d | tar xz`).

    python3 benches/compare.py [--mib 256] [--reps 3] [--out bench-out]

Data: one node, half incompressible (random) and half text. Reports the median
MiB/s (of the uncompressed data) of each tool, the ratio cairn/tar, the compressed
sizes, and the peak RSS of each process tree's largest process."""
import argparse, json, os, shutil, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, generate, run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    node = os.path.join(a.out, "src/node-0")
    generate(node, a.mib)
    data_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(node) for f in fs)
    with open(os.path.join(a.out, "src.toml"), "w") as f:
        f.write(f'name = "bench"\n[[nodes]]\nindex = 0\ndata_dir = "{node}"\n')
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"))
    mib = data_bytes / (1 << 20)
    results = {}

    def record(name, r):
        results.setdefault(name, []).append(r)

    age = shutil.which("age")
    key = os.path.join(a.out, "key.txt")
    recipients = os.path.join(a.out, "recipients.txt")
    if age:
        subprocess.run(["age-keygen", "-o", key], check=True, capture_output=True)
        with open(recipients, "w") as f:
            f.write(subprocess.run(["age-keygen", "-y", key], check=True, capture_output=True, text=True).stdout)
    for rep in range(a.reps):
        store = os.path.join(a.out, "store")
        r = run([cairn, "-q", "plan", "start", "backup-local", "--cluster", os.path.join(a.out, "src.toml"),
                 "-p", f"SNAPSHOT_NAME=b{rep}", "-p", f"BACKUP_DIR={store}"], env=env)
        r["size"] = os.path.getsize(f"{store}/b{rep}/node-0.tar.gz")
        record("cairn backup", r)
        tgt = os.path.join(a.out, f"tgt{rep}")
        with open(os.path.join(a.out, f"tgt{rep}.toml"), "w") as f:
            f.write(f'name = "t"\n[[nodes]]\nindex = 0\ndata_dir = "{tgt}/node-0"\n')
        r = run([cairn, "-q", "plan", "start", "restore-local", "--cluster", os.path.join(a.out, f"tgt{rep}.toml"),
                 "-p", f"SNAPSHOT_NAME=b{rep}", "-p", f"BACKUP_DIR={store}"], env=env)
        record("cairn restore", r)
        shutil.rmtree(tgt)
        shutil.rmtree(f"{store}/b{rep}")
        if age:
            r = run([cairn, "-q", "plan", "start", "backup-local", "--cluster", os.path.join(a.out, "src.toml"),
                     "-p", f"SNAPSHOT_NAME=e{rep}", "-p", f"BACKUP_DIR={store}", "-p", f"ENCRYPT_TO=@{recipients}"], env=env)
            r["size"] = os.path.getsize(f"{store}/e{rep}/node-0.tar.gz")
            record("cairn backup age", r)
            r = run([cairn, "-q", "plan", "start", "restore-local", "--cluster", os.path.join(a.out, f"tgt{rep}.toml"),
                     "-p", f"SNAPSHOT_NAME=e{rep}", "-p", f"BACKUP_DIR={store}", "-p", f"AGE_IDENTITY=@{key}"], env=env)
            record("cairn restore age", r)
            shutil.rmtree(tgt)
            shutil.rmtree(f"{store}/e{rep}")
            enc = os.path.join(a.out, "tar.tgz.age")
            r = run(["sh", "-c", f"tar cz -C {node} app | {age} -R {recipients} -o {enc}"])
            r["size"] = os.path.getsize(enc)
            record("tar cz | age", r)
            x = os.path.join(a.out, "x")
            os.makedirs(x)
            r = run(["sh", "-c", f"{age} -d -i {key} {enc} | tar xz -C {x}"])
            record("age -d | tar xz", r)
            shutil.rmtree(x)
            os.remove(enc)
        tgz = os.path.join(a.out, "tar.tgz")
        r = run(["tar", "czf", tgz, "-C", node, "app"])
        r["size"] = os.path.getsize(tgz)
        record("tar czf", r)
        x = os.path.join(a.out, "x")
        os.makedirs(x)
        r = run(["tar", "xzf", tgz, "-C", x])
        record("tar xzf", r)
        shutil.rmtree(x)
        os.remove(tgz)

    print(f"data: {mib:.0f} MiB in one node (half random, half text); {a.reps} runs each, medians\n")
    print(f"{'tool':16} {'MiB/s':>8} {'peak RSS':>10} {'output':>12}")
    summary = {}
    for name, rs in results.items():
        secs = statistics.median(r["secs"] for r in rs)
        rss = max(r["rss_kib"] for r in rs) / 1024
        size = rs[0].get("size")
        summary[name] = {"mib_s": mib / secs, "peak_rss_mib": rss, "size": size}
        sz = f"{size / (1 << 20):.1f} MiB" if size else "-"
        print(f"{name:16} {mib / secs:8.1f} {rss:8.1f} MiB {sz:>12}")
    b, t = summary["cairn backup"], summary["tar czf"]
    r, x = summary["cairn restore"], summary["tar xzf"]
    print(f"\nbackup  cairn/tar czf throughput ratio: {b['mib_s'] / t['mib_s']:.2f}")
    print(f"restore cairn/tar xzf throughput ratio: {r['mib_s'] / x['mib_s']:.2f} (cairn also verifies every SHA-256 and stages)")
    print(f"compressed size cairn/gzip -6: {b['size'] / t['size']:.3f}")
    if "cairn backup age" in summary:
        be, re_ = summary["cairn backup age"], summary["cairn restore age"]
        print(f"\nencryption cost, same run: backup {be['mib_s'] / b['mib_s']:.2f}x, restore {re_['mib_s'] / r['mib_s']:.2f}x the unencrypted throughput")
        print(f"backup  cairn age/tar cz | age throughput ratio: {be['mib_s'] / summary['tar cz | age']['mib_s']:.2f}")
        print(f"restore cairn age/age -d | tar xz throughput ratio: {re_['mib_s'] / summary['age -d | tar xz']['mib_s']:.2f}")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark scripts."""
import json, os, random, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    """Run a command in a fresh wrapper process so its peak RSS is its own."""
    wrapper = (
        "import resource,subprocess,sys,time,json;"
        "t=time.perf_counter();r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL);"
        "d=time.perf_counter()-t;"
        "print(json.dumps({'rc':r.returncode,'secs':d,'rss_kib':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True, text=True, **kw)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        sys.exit(f"command failed: {cmd}\n{out.stderr}")
    return res


def generate(node, mib):
    half = mib * (1 << 20) // 2
    rnd = random.Random(42)
    words = [w.encode() for w in "id name email city order amount sensor reading temperature status ok failed".split()]
    os.makedirs(f"{node}/app/blobs", exist_ok=True)
    os.makedirs(f"{node}/app/logs", exist_ok=True)
    chunk = 16 << 20
    for i in range(max(1, half // chunk)):
        with open(f"{node}/app/blobs/nb-{i}-Data.db", "wb") as f:
            f.write(os.urandom(chunk))
    for i in range(max(1, half // chunk)):
        with open(f"{node}/app/logs/nb-{i}-Data.db", "wb") as f:
            lines = []
            size = 0
            while size < chunk:
                line = b" ".join(rnd.choice(words) for _ in range(10)) + b" %d\n" % rnd.randrange(10**9)
                lines.append(line)
                size += len(line)
            f.write(b"".join(lines)[:chunk])


AK, SK = "bench-access", "bench-secret-key"


def start_s3s(data, bucket=None):
    """s3s-fs on a free loopback port serving `data` (with `bucket` made in it):
    the process and its URL."""
    exe = os.environ.get("CAIRN_TEST_S3S_FS") or os.path.join(ROOT, ".tools/bin/s3s-fs")
    os.makedirs(os.path.join(data, bucket) if bucket else data, exist_ok=True)
    p = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", "0", "--access-key", AK, "--secret-key", SK, data],
                         env=dict(os.environ, RUST_LOG="info"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = p.stdout.readline()
        if "server is running at" in line:
            return p, line[line.index("http://"):].split()[0].rstrip("/")
    p.kill()
    sys.exit("s3s-fs did not start")

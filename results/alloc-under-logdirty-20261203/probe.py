"""Guest-side cost of writing free memory for the first time, with and without log-dirty on.

Run as root beside a built testbed, from the checkout after `make setup`:
PYTHONPATH=. .venv/bin/python results/alloc-under-logdirty-20261203/probe.py
(boots it, starts a 1 GiB PVH guest with no page cache, fills 700 MiB of tmpfs in it three
times plain and three times while dom0 holds log-dirty on; appends to result.txt here)."""
import os, sys, tempfile, time, re
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
from softpage_testbed import XEN_PVH_VERSION, GuestSpec, TestbedConfig, booted_testbed
from tests.bench import xen_bench
os.environ.setdefault("SOFTPAGE_DATA_MB", "1024")
os.environ.setdefault("SOFTPAGE_QEMU_MEM_MB", str(1024 + 2 * 1024 + 1024))
t0 = time.monotonic()
OUT = Path(__file__).with_name("result.txt")
def p(*a):
    line = " ".join(str(x) for x in a)
    print(f"[{time.monotonic()-t0:7.1f}] {line}", flush=True)
    with OUT.open("a") as f: f.write(line + "\n")
LOGDIRTY = r'''
import sys, time, os
from softpage.xen.backend import XenBackend
b = XenBackend(int(sys.argv[1]))
b.enable_logdirty()
open("/tmp/ld-on", "w").close()
while not os.path.exists("/tmp/ld-off"):
    time.sleep(0.2)
d = b.harvest_dirty(final=False)
print("dirty", d.count(), flush=True)
b.cleanup()
'''
with booted_testbed(TestbedConfig.from_env(XEN_PVH_VERSION), Path(tempfile.mkdtemp(prefix="probe2-"))) as tb:
    p("booted")
    spec = GuestSpec(name="alloc", guest_type="pvh", memory_mb=1024, anon_mb=0, cache_mb=0, dirty_rate=100)
    g = xen_bench.start_guest(tb, spec)
    p("guest ready")
    n = [0]
    def guest(cmd, timeout=600):
        n[0] += 1; tag = f"P{n[0]}"
        g.console_command(f"echo {tag}-BEGIN; {cmd}; echo {tag}-END")
        return g.wait_for(rf"(?s){tag}-BEGIN\r?\n(.*?){tag}-END", timeout_s=timeout).group(1)
    p(guest("grep -E 'MemFree|init_on' /proc/meminfo; cat /proc/cmdline; mkdir -p /mnt/t; mount -t tmpfs -o size=900m tmpfs /mnt/t; echo mounted"))
    fill = "a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero of=/mnt/t/f bs=1M count={mb} 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime); rm /mnt/t/f; echo FILL {mb} $a $b"
    tb.write_file("/tmp/ld.py", LOGDIRTY)
    for rep in range(3):
        for mode in ("plain", "logdirty"):
            if mode == "logdirty":
                domid = tb.run(["xl", "domid", "alloc"], check=True).stdout.strip()
                tb.run(f"rm -f /tmp/ld-on /tmp/ld-off; nohup python3 /tmp/ld.py {domid} > /tmp/ld.out 2>&1 &", check=True)
                for _ in range(120):
                    if tb.run("test -f /tmp/ld-on").ok: break
                    time.sleep(1)
            out = guest(fill.format(mb=700))
            m = re.search(r"FILL (\d+) ([\d.]+) ([\d.]+)", out)
            secs = float(m.group(3)) - float(m.group(2))
            extra = ""
            if mode == "logdirty":
                tb.run("touch /tmp/ld-off"); time.sleep(3)
                extra = tb.run("cat /tmp/ld.out").stdout.strip()
            p(f"rep {rep} {mode}: 700 MiB tmpfs fill {secs:.2f} s ({secs / (700*256) * 1e6:.1f} us/page) {extra}")
